"""The image: every local module the handler needs is copied in, and its packages are exactly the pins."""

import ast
import re
import shlex

from conftest import ROOT


def local_imports(module: str, seen: set[str]) -> set[str]:
    """The project's own modules that `module` imports, transitively (lazy imports inside functions too)."""
    if module in seen or not (ROOT / f"{module}.py").is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            local_imports(name.split(".")[0], seen)
    return seen


def test_every_module_the_handler_imports_is_copied_into_the_image():
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(p.removesuffix(".py") for p in line.split()[1:-1])
    needed = local_imports("handler", set())
    assert {"handler", "job", "storage", "dataset_loader", "train_lora", "chat_labels"} <= needed
    assert needed <= copied, f"missing from the image: {needed - copied}"


# --- what the image installs ------------------------------------------------------------------------

def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction: continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


CONTROL = {"&&", "||", ";", "|", "&", "(", ")"}
PIP = re.compile(r"(.*/)?pip(\d+(\.\d+)?)?")


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of every `pip install` in a shell command (pip, pip3, python -m pip, uv pip ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens, installs = list(lexer), []
    for i, token in enumerate(tokens[:-1]):
        if PIP.fullmatch(token) and tokens[i + 1] == "install":
            args = []
            for arg in tokens[i + 2:]:
                if arg in CONTROL:
                    break
                args.append(arg)
            installs.append(args)
    return installs


# Options that change neither what is installed nor where it comes from.
HARMLESS = {"--no-cache-dir", "-q", "--quiet", "--no-input", "--disable-pip-version-check", "--no-compile"}


def requirements_only(args: list[str]) -> list[str]:
    """What is wrong with a `pip install` that must install exactly `-r requirements.txt` ([] if nothing)."""
    problems, requirement_files, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-r", "--requirement") and i + 1 < len(args):
            requirement_files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--requirement="):
            requirement_files.append(arg.partition("=")[2])
        elif arg not in HARMLESS:
            problems.append(f"unexpected argument {arg!r}" if arg.startswith("-") else f"extra package {arg!r}")
        i += 1
    if requirement_files != ["requirements.txt"]:
        problems.append(f"installs requirement files {requirement_files}, not exactly ['requirements.txt']")
    return problems


PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[0-9][A-Za-z0-9.+!-]*")


def unpinned(requirements: str) -> list[str]:
    """The requirement lines that are not a single `name==version` pin (comments and blanks aside)."""
    lines = (line.split("#", 1)[0].strip() for line in requirements.splitlines())
    return [line for line in lines if line and not PIN.fullmatch(line)]


def base_image_problem(from_args: str) -> str | None:
    """Why a FROM line's image is not a specific tag (None if it is): no tag, `latest`, or no version in it."""
    words = [w for w in from_args.split() if not w.startswith("--")]
    image = words[0] if words else ""
    if "@sha256:" in image:
        return None
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    if not tag:
        return f"{image!r} has no tag"
    if tag == "latest":
        return f"{image!r} is latest"
    if not re.search(r"\d+\.\d+", tag):
        return f"{image!r}: tag {tag!r} names no version"
    return None


def test_the_helpers_reject_what_would_change_the_image_packages():
    bad = instructions(
        "FROM python:latest\n"
        "RUN pip install -r requirements.txt torch==2.12.0\n"
        "RUN pip install --index-url https://download.pytorch.org/whl/cu128 \\\n    -r requirements.txt\n"
        "RUN apt-get update && python -m pip install --no-cache-dir bitsandbytes && echo done\n"
        "RUN pip3 install -r requirements-dev.txt\n"
    )
    runs = [args for keyword, args in bad if keyword == "RUN"]
    problems = [requirements_only(args) for run in runs for args in pip_installs(run)]
    assert len(problems) == 4 and all(problems), problems
    assert "extra package 'torch==2.12.0'" in problems[0]
    assert "unexpected argument '--index-url'" in problems[1]
    assert "extra package 'bitsandbytes'" in problems[2]
    good = pip_installs('pip install --no-cache-dir -r requirements.txt && python -c "import pip; print(1)"')
    assert good == [["--no-cache-dir", "-r", "requirements.txt"]] and requirements_only(good[0]) == []
    assert unpinned("# c\ntorch==2.13.0\nfoo[bar]==1.0  # why\ntorch>=2.13\npeft\n--index-url https://x\n") == [
        "torch>=2.13", "peft", "--index-url https://x"]
    assert [base_image_problem(a) for a in ("python", "python:latest", "pytorch/pytorch", "python:slim",
                                              "localhost:5000/python", "python:3.11.16-slim-bookworm AS base",
                                              "--platform=linux/amd64 python:3.11-slim-bookworm")] == [
        "'python' has no tag", "'python:latest' is latest", "'pytorch/pytorch' has no tag",
        "'python:slim': tag 'slim' names no version", "'localhost:5000/python' has no tag", None, None]


def test_the_image_installs_exactly_the_pinned_requirements_on_a_specific_base():
    steps = instructions((ROOT / "Dockerfile").read_text())
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms and [base_image_problem(args) for args in froms] == [None] * len(froms)
    installs = [args for keyword, run in steps if keyword == "RUN" for args in pip_installs(run)]
    assert installs, "the Dockerfile installs nothing with pip"
    assert [requirements_only(args) for args in installs] == [[]] * len(installs)
    requirements = (ROOT / "requirements.txt").read_text()
    assert unpinned(requirements) == [] and re.search(r"^torch==\d", requirements, re.M)


def test_the_dependency_layer_is_built_before_the_code_is_copied():
    """Editing a module must not reinstall the packages: requirements.txt is copied and installed first."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    first_code = next(i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and ".py" in args)
    install = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and pip_installs(args))
    copy_requirements = next(i for i, step in enumerate(steps) if step == ("COPY", "requirements.txt ."))
    assert copy_requirements < install < first_code
