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
