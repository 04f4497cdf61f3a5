"""The image: every local module the handler needs is copied in, and torch matches the pins."""

import ast
import re

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


def test_the_image_checks_for_the_torch_that_requirements_pin():
    pinned = re.search(r"^torch==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"pytorch/pytorch:{pinned}-" in dockerfile and f"'{pinned}'" in dockerfile
