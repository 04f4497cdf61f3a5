"""The README's tables and the example jobs come from the job model: they must not drift, and they run."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from conftest import ROOT
from gen_docs import app_job, example_job, render_readme
from job import parse_job_input

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


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
    assert warnings == [] and (job.hyperparameters.epochs, job.hyperparameters.lora_rank, job.gpu_config.count) == (3, 16, 1)
    assert job.hyperparameters.base_model == "mistralai/Mistral-7B-Instruct-v0.2"


def test_python_handler_py_runs_its_smoke_test_in_a_checkout(tmp_path):
    """RunPod's convention: `python handler.py`, started outside RunPod, runs test_input.json as one job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")} | {
        "JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Job local_test completed successfully" in run.stdout + run.stderr
    adapter = tmp_path / "jobs" / "local-smoke-test" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "metrics.json").read_text())["steps"] == 5


def test_runpod_hub_files_are_generated_from_the_settings():
    from gen_docs import hub_json, tests_json

    assert json.loads((ROOT / ".runpod" / "hub.json").read_text()) == hub_json()
    assert json.loads((ROOT / ".runpod" / "tests.json").read_text()) == tests_json()


def test_the_hub_smoke_test_job_trains_as_the_image_would(tmp_path, monkeypatch):
    """The .runpod/tests.json job, run by the handler with the image's paths mapped onto this checkout."""
    import handler
    from gen_docs import tests_json

    job_input = json.loads(json.dumps(tests_json()["tests"][0]["input"]).replace("file:///app/", (ROOT.as_uri() + "/")))
    for item in tests_json()["config"]["env"]:
        monkeypatch.setenv(item["key"], item["value"])
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "hub-test-endpoint")  # as on RunPod: no S3, so VOLUME_DELIVERY
    result = handler.handler({"id": "hub-test", "input": job_input})
    assert "error" not in result, result
    assert result["metrics"]["steps"] == 5 and (tmp_path / "models" / "tiny-random" / "qwen2" / "config.json").is_file()
    assert "model_files" not in result and Path(result["volume_files"]["adapter_model.safetensors"]).is_file()


def test_the_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
