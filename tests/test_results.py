"""The job's result: strict JSON held to the SDK's size limit whatever the job produced, and a stored result that
cannot be read set aside (the job trains again)."""

import json

import pytest

import handler
from conftest import SAMPLE
from results import MAX_RESULT_BYTES, sendable


def test_the_output_is_strict_json_and_bounded_whatever_the_job_produced():
    problems = [{"line": i, "message": f"line {i}: " + "x" * 200} for i in range(20_000)]
    result = sendable({"metrics": {"train_loss_last": float("nan"), "grad": float("inf"), "ok": 1.5,
                                   "length_report": {"dropped": 20_000, "problems": list(problems)}},
                       "dataset_report": {"invalid": 20_000, "problems": list(problems)}, "warnings": []})
    text = json.dumps(result, allow_nan=False)  # strict JSON: no NaN, no Infinity
    assert len(text.encode()) <= MAX_RESULT_BYTES
    assert result["metrics"]["train_loss_last"] is None and result["metrics"]["ok"] == 1.5
    assert result["dataset_report"]["invalid"] == 20_000 and result["metrics"]["length_report"]["dropped"] == 20_000
    assert any("shortened" in w for w in result["warnings"])


@pytest.mark.slow  # trains the tiny model
def test_an_unreadable_stored_result_is_set_aside_and_the_job_trains_again(tiny_qwen2, storage, tmp_path, monkeypatch):
    for key, value in {"JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
                       "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "jobs" / "truncated").mkdir(parents=True)
    (tmp_path / "jobs" / "truncated" / "result.json").write_text('{"input_fingerprint": "ab')  # cut short by a crash
    result = handler.handler({"id": "p3", "input": {
        "job_id": "truncated", "dataset_url": storage.url(SAMPLE.name, storage.good),
        "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "batch_size": 2, "max_seq_length": 256}}})
    assert "error" not in result, result
    assert any("could not be read" in w for w in result["warnings"])
    assert list((tmp_path / "jobs" / "truncated").glob("result.json.bad-*"))
