"""The README's tables and test_input.json come from the job model: they must not drift."""

import json

from conftest import ROOT
from gen_docs import example_job, render_readme
from job import parse_job_input


def test_readme_tables_match_the_job_model_and_the_settings():
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme) == readme, "README tables are stale: run python scripts/gen_docs.py"


def test_test_input_json_is_the_generated_example_and_is_valid():
    on_disk = json.loads((ROOT / "test_input.json").read_text())
    assert on_disk == example_job(), "test_input.json is stale: run python scripts/gen_docs.py"
    job, warnings = parse_job_input(on_disk["input"])
    assert warnings == [] and job.hyperparameters.epochs == 3 and job.gpu_config.count == 1


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
    result = handler.handler({"id": "hub-test", "input": job_input})
    assert "error" not in result, result
    assert result["metrics"]["steps"] == 5 and (tmp_path / "models" / "tiny-random" / "qwen2" / "config.json").is_file()


def test_the_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
