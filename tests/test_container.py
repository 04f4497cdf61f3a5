"""The image: every local module the handler needs is copied in, and its packages are exactly the pins: torch as
PyTorch's CUDA 12.6 build of its pin, the rest from requirements.txt."""

import ast
import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


def local_imports(module: str, seen: set[str]) -> set[str]:
    """The project's own modules that `module` imports, transitively (lazy imports inside functions too)."""
    if module in seen or not (ROOT / f"{module}.py").is_file():
        return seen
    seen.add(module)
    for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
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


def parse_install(args: list[str], option: tuple[str, str]) -> tuple[list[str], list[str], list[str]]:
    """A `pip install`'s arguments: the values of `option` (short and long form, `--long=value` too), the packages,
    and what is wrong with the rest (options other than HARMLESS)."""
    values, packages, problems, i = [], [], [], 0
    while i < len(args):
        arg = args[i]
        if arg in option and i + 1 < len(args):
            values.append(args[i + 1])
            i += 2
            continue
        if arg.startswith(option[1] + "="):
            values.append(arg.partition("=")[2])
        elif arg.startswith("-"):
            if arg not in HARMLESS:
                problems.append(f"unexpected argument {arg!r}")
        else:
            packages.append(arg)
        i += 1
    return values, packages, problems


def requirements_only(args: list[str]) -> list[str]:
    """What is wrong with a `pip install` that must install exactly `-r requirements.txt` ([] if nothing)."""
    requirement_files, packages, problems = parse_install(args, ("-r", "--requirement"))
    problems += [f"extra package {p!r}" for p in packages]
    if requirement_files != ["requirements.txt"]:
        problems.append(f"installs requirement files {requirement_files}, not exactly ['requirements.txt']")
    return problems


# torch: PyTorch's CUDA 12.6 build of requirements.txt's pin, from PyTorch's index for that build. PyPI's torch for
# Linux is the CUDA 13.0 build, which needs an NVIDIA driver >= 580 (docs/DEPLOY.md, "The image").
TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
TORCH_BUILD = "cu126"


def torch_pin(requirements: str) -> str:
    """The version requirements.txt pins torch to."""
    match = re.search(r"^torch==(\S+)\s*$", requirements, re.M)
    assert match, "requirements.txt pins no torch"
    return match.group(1)


def torch_install_problems(args: list[str], pin: str) -> list[str]:
    """What is wrong with a `pip install` that must install exactly `torch==<pin>+cu126` from TORCH_INDEX alone
    ([] if nothing)."""
    index_urls, packages, problems = parse_install(args, ("-i", "--index-url"))
    if [url.rstrip("/") for url in index_urls] != [TORCH_INDEX]:
        problems.append(f"installs from index {index_urls}, not exactly [{TORCH_INDEX!r}]")
    want = f"torch=={pin}+{TORCH_BUILD}"
    if packages != [want]:
        problems.append(f"installs {packages}, not exactly [{want!r}] (requirements.txt pins torch=={pin})")
    return problems


def python_checks(command: str) -> list[str]:
    """The code of every `python -c CODE` in a shell command."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    return [tokens[i + 2] for i in range(len(tokens) - 2)
            if re.fullmatch(r"(.*/)?python(\d+(\.\d+)?)?", tokens[i]) and tokens[i + 1] == "-c"]


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
    assert torch_install_problems(["--index-url", TORCH_INDEX, "torch==2.13.0+cu126"], "2.13.0") == []
    assert torch_install_problems(["--no-cache-dir", f"--index-url={TORCH_INDEX}/", "torch==2.13.0+cu126"],
                                  "2.13.0") == []
    for args in (["--index-url", TORCH_INDEX, "torch==2.12.0+cu126"],                   # not the pinned version
                 ["--index-url", TORCH_INDEX, "torch==2.13.0"],                          # any build
                 ["--index-url", "https://download.pytorch.org/whl/cu128", "torch==2.13.0+cu128"],
                 ["torch==2.13.0+cu126"],                                                 # PyPI: not there
                 ["--index-url", TORCH_INDEX, "--extra-index-url", "https://pypi.org/simple", "torch==2.13.0+cu126"],
                 ["--index-url", TORCH_INDEX, "torch==2.13.0+cu126", "bitsandbytes==0.50.2"],
                 ["--index-url", TORCH_INDEX, "torch==2.13.0+cu126", "-r", "requirements.txt"]):
        assert torch_install_problems(args, "2.13.0"), args
    assert torch_pin("# c\ntransformers==5.23.0\ntorch==2.13.0\n") == "2.13.0"
    assert python_checks('pip install -r r.txt && python -c "import sys; print(1)" && python3 -c \'x = 1\'') == [
        "import sys; print(1)", "x = 1"]
    assert [base_image_problem(a) for a in ("python", "python:latest", "pytorch/pytorch", "python:slim",
                                              "localhost:5000/python", "python:3.11.16-slim-bookworm AS base",
                                              "--platform=linux/amd64 python:3.11-slim-bookworm")] == [
        "'python' has no tag", "'python:latest' is latest", "'pytorch/pytorch' has no tag",
        "'python:slim': tag 'slim' names no version", "'localhost:5000/python' has no tag", None, None]


def test_the_image_installs_exactly_the_pinned_requirements_on_a_specific_base():
    """One `pip install` of torch: PyTorch's CUDA 12.6 build of the pinned version, from PyTorch's cu126 index alone;
    every other one `-r requirements.txt` and nothing else."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert froms and [base_image_problem(args) for args in froms] == [None] * len(froms)
    requirements = (ROOT / "requirements.txt").read_text()
    assert unpinned(requirements) == []
    pin = torch_pin(requirements)
    installs = [args for keyword, run in steps if keyword == "RUN" for args in pip_installs(run)]
    torch_installs = [args for args in installs if requirements_only(args)]
    assert len(torch_installs) == 1, f"expected one pip install besides -r requirements.txt: {torch_installs}"
    assert torch_install_problems(torch_installs[0], pin) == []
    assert len(installs) - len(torch_installs) >= 1, "the Dockerfile never installs -r requirements.txt"


def test_the_dependency_layers_are_built_before_the_code_is_copied():
    """Editing a module must not reinstall the packages: torch, then requirements.txt (copied first), are installed
    before any module is copied. torch comes first, so that `-r requirements.txt` finds torch==<pin> met by the
    CUDA 12.6 build and never fetches PyPI's CUDA 13.0 one."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    first_code = next(i for i, (keyword, args) in enumerate(steps) if keyword == "COPY" and ".py" in args)
    copy_requirements = next(i for i, step in enumerate(steps) if step == ("COPY", "requirements.txt ."))
    installs = [(i, args) for i, (keyword, run) in enumerate(steps) if keyword == "RUN" for args in pip_installs(run)]
    torch_install = next(n for n, (_, args) in enumerate(installs) if requirements_only(args))
    requirement_installs = [n for n, (_, args) in enumerate(installs) if not requirements_only(args)]
    assert requirement_installs and torch_install < min(requirement_installs)
    assert all(copy_requirements < installs[n][0] for n in requirement_installs)
    assert all(i < first_code for i, _ in installs)


def test_the_build_fails_unless_torch_is_the_cuda_12_6_build_and_bitsandbytes_has_its_library(tmp_path):
    """The build's check, run here on this virtualenv's packages with torch made to look like each build: it passes
    for the CUDA 12.6 build of the pinned torch with bitsandbytes' own CUDA 12.6 library, and fails the build for
    PyPI's CUDA 13.0 build, another version, or a bitsandbytes without that library."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    checks = [code for keyword, run in steps if keyword == "RUN" for code in python_checks(run)]
    assert len(checks) == 1, checks
    check = checks[0]
    imported = {alias.name for node in ast.walk(ast.parse(check)) if isinstance(node, ast.Import)
                for alias in node.names}
    assert {"torch", "bitsandbytes", "transformers", "peft", "runpod", "postgrest", "storage3"} <= imported, imported
    pin = torch_pin((ROOT / "requirements.txt").read_text())

    def run(version: str, cuda: str, bnb_dir=None) -> subprocess.CompletedProcess:
        prelude = ("import torch, torch.torch_version as v\n"
                   f"torch.__version__ = v.TorchVersion({version!r}); torch.version.cuda = {cuda!r}\n")
        if bnb_dir is not None:  # a bitsandbytes whose package holds only these libraries
            prelude += f"import pathlib, bitsandbytes.cextension as c; c.PACKAGE_DIR = pathlib.Path({str(bnb_dir)!r})\n"
        return subprocess.run([sys.executable, "-c", prelude + check], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)

    ok = run(f"{pin}+cu126", "12.6")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"{pin}+cu126" in ok.stdout and "CUDA 12.6" in ok.stdout and "libbitsandbytes_cuda126.so" in ok.stdout
    for version, cuda in ((f"{pin}+cu130", "13.0"), (pin, "13.0"), (f"{pin}+cpu", None), ("2.12.0+cu126", "12.6")):
        failed = run(version, cuda)
        assert failed.returncode != 0 and "is not" in failed.stderr, (version, cuda, failed.stderr[-2000:])
    for name in ("libbitsandbytes_cuda124.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so"):
        (tmp_path / name).write_bytes(b"")
    failed = run(f"{pin}+cu126", "12.6", bnb_dir=tmp_path)
    assert failed.returncode != 0 and "has no CUDA 12.6 library" in failed.stderr, failed.stderr[-2000:]


def test_the_runpod_hub_files_allow_cuda_12_6_and_nothing_below():
    """The RunPod Hub endpoint and its test run only on hosts whose driver supports CUDA 12.6 (driver >= 560): every
    CUDA version RunPod offers from 12.6 up, none below."""
    for name in ("hub.json", "tests.json"):
        versions = json.loads((ROOT / ".runpod" / name).read_text())["config"]["allowedCudaVersions"]
        parsed = [tuple(int(part) for part in version.split(".")) for version in versions]
        assert len(set(versions)) == len(versions), (name, versions)
        assert min(parsed) == (12, 6), f"{name} allows CUDA {versions}: the image needs 12.6 or newer"
        assert {"12.6", "12.7", "12.8", "12.9", "13.0"} <= set(versions), (
            f"{name} leaves out hosts the image runs on: {versions}")
