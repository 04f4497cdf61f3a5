"""The documents: the README's tables and the example jobs come from the job model (they must not drift, and they
run); the README stays a newcomer's page; the links between the documents resolve, and every test, test file and
`module.name` they cite exists."""

import ast
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from gen_docs import app_job, example_job, hub_json, render_readme
from gen_docs import tests_json as hub_tests_json  # a name starting with `test` would be collected as a test
from job import parse_job_input

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"py", "json", "jsonl", "log", "lock", "md", "txt"}  # `job.py`, `job.log`: files, not names
README_LIMIT_BYTES = 25_000  # what a newcomer reads: what it is, the commands, a job, the settings, the map


def test_readme_tables_match_the_job_model_and_the_settings():
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme) == readme, "README tables are stale: run python scripts/gen_docs.py"


def test_the_example_jobs_are_generated_and_valid():
    on_disk = json.loads((ROOT / "test_input.json").read_text())
    assert on_disk == example_job(), "test_input.json is stale: run python scripts/gen_docs.py"
    job, warnings = parse_job_input(on_disk["input"])
    assert warnings == [] and job.hyperparameters.base_model == "tiny-random/qwen2"
    app = json.loads((ROOT / "app_job.example.json").read_text())
    assert app == app_job(), "app_job.example.json is stale: run python scripts/gen_docs.py"
    job, warnings = parse_job_input(app["input"])
    hp = job.hyperparameters
    assert warnings == [] and (hp.epochs, hp.lora_rank, job.gpu_config.count) == (3, 16, 1)
    assert job.hyperparameters.base_model == "mistralai/Mistral-7B-Instruct-v0.2"


@pytest.mark.slow  # trains the tiny model in a subprocess
def test_python_handler_py_runs_its_smoke_test_in_a_checkout(tmp_path):
    """RunPod's convention: `python handler.py`, started outside RunPod, runs test_input.json as one job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")} | {
        "JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
        "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Job local_test completed successfully" in run.stdout + run.stderr
    adapter = tmp_path / "jobs" / "local-smoke-test" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "metrics.json").read_text())["steps"] == 5


def test_runpod_hub_files_are_generated_from_the_settings():
    assert json.loads((ROOT / ".runpod" / "hub.json").read_text()) == hub_json()
    assert json.loads((ROOT / ".runpod" / "tests.json").read_text()) == hub_tests_json()


@pytest.mark.slow  # trains the tiny model through the handler
def test_the_hub_smoke_test_job_trains_as_the_image_would(tmp_path, monkeypatch):
    """The .runpod/tests.json job, run by the handler with the image's paths mapped onto this checkout."""
    import handler  # here, not at the top: importing it takes about 2 s, which only this end-to-end test needs

    hub_job = json.dumps(hub_tests_json()["tests"][0]["input"])
    job_input = json.loads(hub_job.replace("file:///app/", (ROOT.as_uri() + "/")))
    for item in hub_tests_json()["config"]["env"]:
        monkeypatch.setenv(item["key"], item["value"])
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "hub-test-endpoint")  # as on RunPod: no S3, so VOLUME_DELIVERY
    result = handler.handler({"id": "hub-test", "input": job_input})
    assert "error" not in result, result
    assert result["metrics"]["steps"] == 5 and (tmp_path / "models" / "tiny-random" / "qwen2" / "config.json").is_file()
    assert "model_files" not in result and Path(result["volume_files"]["adapter_model.safetensors"]).is_file()


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_readme_stays_a_newcomers_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size:,} bytes, over {README_LIMIT_BYTES:,}: move detail for one reader into docs/ "
        "(the app's team: APP.md, operators: DEPLOY.md, ML readers: TRAINING.md, developers: DEVELOPMENT.md)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.

    >>> _anchor("Does the model fit? (`python train_lora.py estimate`)")
    'does-the-model-fit-python-train_lorapy-estimate'
    """
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(document: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in document.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchor = _anchor(line.lstrip("#"))
            found.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return found


def _links(document: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_between_the_documents_resolves(document):
    broken = []
    for link in _links(document):
        if re.match(r"[a-z]+:", link):  # https:, mailto:: outside the checkout
            continue
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with the anchor #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), flags=re.M))
    return names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_the_tests_and_test_files_a_document_names_exist(document):
    text = document.read_text()
    missing = sorted(set(re.findall(r"`(test_\w+)`", text)) - _defined_tests())
    missing += sorted({f for f in re.findall(r"`(tests/[\w/.-]+\.py)`", text) if not (ROOT / f).is_file()})
    assert not missing, f"{document.name} names tests or test files that do not exist: {', '.join(missing)}"


def _top_level_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_module_name_a_document_cites_is_defined_there(document):
    """`files.real_dir`, `architecture.check_fits`: a reader looking for the behaviour finds it in one hop."""
    missing = []
    for module, name in sorted(set(re.findall(r"`([a-z_]+)\.([A-Za-z_]\w*)", document.read_text()))):
        path = ROOT / f"{module}.py"
        if path.is_file() and name not in FILE_SUFFIXES and name not in _top_level_names(path):
            missing.append(f"{module}.{name}")
    assert not missing, f"{document.name} cites names its modules do not define: {', '.join(missing)}"
