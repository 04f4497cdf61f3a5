"""The whole worker, through the RunPod SDK's local API server, over real HTTP, with real 4-bit layers: a job
killed with SIGKILL resumes on a new worker, and no planted secret reaches a log, an output or a file."""

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import S3_KEYS, SAMPLE, free_port, running_worker, runsync
from model_loading import quantization_config, same_kernels_in_eval

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with running_worker(tmp_path_factory.mktemp("worker")) as w:
        yield w


def test_job_trains_an_adapter_that_changes_the_model(worker, storage, tiny_qwen2):
    result = runsync(worker, {
        "job_id": "e2e-shape-a",
        "dataset_url": storage.url(SAMPLE.name, storage.good),
        # shape A of the app's payload
        "hyperparameters": {"base_model": str(tiny_qwen2), "learning_rate": 1e-3, "batch_size": 4, "epochs": 1,
                            "rank": 8, "alpha": 16, "max_seq_length": 512, "max_steps": 4},
        "gpu_config": {"type": "NVIDIA A100 80GB", "count": 1},
    })
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    adapter = Path(output["adapter_path"])
    assert adapter == worker.jobs / "e2e-shape-a" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.json",
                 "metrics.json"):
        assert (adapter / name).is_file(), name
        assert output["model_files"][name] == (adapter / name).resolve().as_uri()
    metrics = output["metrics"]
    assert metrics["steps"] == 4
    assert math.isfinite(metrics["train_loss_first"]) and math.isfinite(metrics["train_loss_last"])
    assert output["dataset_report"]["examples"] == 44
    assert output["model_metadata"]["lora"]["rank"] == 8 and output["model_metadata"]["lora"]["alpha"] == 16
    job_log = (worker.jobs / "e2e-shape-a" / "job.log").read_text()
    assert "sha256" in job_log and storage.good not in job_log

    # The adapter loads on the 4-bit base model and changes its logits.
    base = same_kernels_in_eval(AutoModelForCausalLM.from_pretrained(
        tiny_qwen2, quantization_config=quantization_config(torch.float32), dtype=torch.float32).eval())
    ids = torch.tensor([[5, 17, 99, 312, 7, 1000]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter).eval()
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_expired_dataset_url_fails_with_what_to_do(worker, storage, tiny_qwen2):
    result = runsync(worker, {"job_id": "e2e-expired", "dataset_url": storage.url(SAMPLE.name, storage.old),
                              "hyperparameters": {"base_model": str(tiny_qwen2)}})
    assert result["status"] == "FAILED"
    assert "expired" in result["error"] and "resubmit" in result["error"]
    assert storage.old not in result["error"]
    assert not (worker.jobs / "e2e-expired" / "dataset.download").exists()


def test_unreachable_dataset_url_fails_with_the_cause(worker, tiny_qwen2):
    result = runsync(worker, {"job_id": "e2e-unreachable",
                              "dataset_url": f"http://127.0.0.1:{free_port()}/d.jsonl?token=secret",
                              "hyperparameters": {"base_model": str(tiny_qwen2)}})
    assert result["status"] == "FAILED"
    assert result["error"].startswith("downloading: ") and "could not connect" in result["error"]
    assert "secret" not in result["error"]


def test_invalid_input_lists_every_problem(worker):
    result = runsync(worker, {"dataset_url": "ftp://x/y", "hyperparameters": {"learning_rate": 0.5}, "gpu_config": {}})
    assert result["status"] == "FAILED"
    assert result["error"] == ("validating: invalid job input: dataset_url='ftp://x/y': must be an http(s) URL; "
                               "hyperparameters.learning_rate=0.5 is above 0.001; gpu_config.count is missing")


def test_a_missing_base_model_fails_before_anything_is_downloaded(worker, storage):
    result = runsync(worker, {"job_id": "e2e-no-model", "dataset_url": storage.url(SAMPLE.name, storage.good),
                              "hyperparameters": {"base_model": "/models/not-cached-7B"}})  # a path: never downloaded
    assert result["status"] == "FAILED"
    assert result["error"].startswith("loading_model: base model '/models/not-cached-7B' was not found; searched ")
    assert ("name a Hugging Face Hub model as <org>/<name> to download it" in result["error"]
            and storage.hits[SAMPLE.name] == 0)
    # a hub id that is not cached is looked up on the Hub (here: nothing answers) before the dataset is downloaded
    result = runsync(worker, {"job_id": "e2e-no-hub", "dataset_url": storage.url(SAMPLE.name, storage.good),
                              "hyperparameters": {"base_model": "someone/not-cached-7B"}})
    assert result["error"].startswith("loading_model: downloading base model 'someone/not-cached-7B' failed: ")
    assert storage.hits[SAMPLE.name] == 0


def test_kill_9_mid_training_then_the_same_job_resumes_and_completes(storage, tiny_qwen2, tmp_path):
    job = {"job_id": "kill-9", "dataset_url": storage.url(SAMPLE.name, storage.good),
           "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 40, "batch_size": 1, "max_seq_length": 384,
                               "lora_rank": 4, "checkpoint_steps": 3}}
    (tmp_path / "first").mkdir()
    with running_worker(tmp_path / "first") as worker:
        # The SDK's local server runs a job inside the request that asks for it: send it from a thread.
        def submit():
            try:
                requests.post(f"{worker.url}/runsync", json={"input": job}, timeout=300)
            except requests.ConnectionError:
                pass  # the worker is killed mid-job: no answer is the point

        threading.Thread(target=submit, daemon=True).start()
        checkpoints = worker.jobs / "kill-9" / "checkpoints"
        deadline = time.monotonic() + 180
        while not any(p.name.startswith("checkpoint-") and p.name[11:].isdigit() for p in checkpoints.glob("*")):
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.2)
        worker.proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
        worker.proc.wait()
    assert (tmp_path / "first" / "jobs" / "kill-9" / "job.lock").exists()
    (tmp_path / "second").mkdir()
    os.symlink(tmp_path / "first" / "jobs", tmp_path / "second" / "jobs")  # the same volume, a new worker
    with running_worker(tmp_path / "second") as worker:
        result = runsync(worker, job)
        assert result["status"] == "COMPLETED", result
        metrics = result["output"]["metrics"]
        assert metrics["resumed_from_step"] > 0 and metrics["steps"] == 40
        again = runsync(worker, job)  # a completed job is not trained twice
        assert again["status"] == "COMPLETED" and again["output"]["metrics"] == metrics
        assert any("already completed" in w for w in again["output"]["warnings"])
        other = runsync(worker, {**job, "hyperparameters": {**job["hyperparameters"], "lora_rank": 8}})
        assert other["status"] == "FAILED"
        assert other["error"] == ("starting: job kill-9 already completed with other settings or another dataset: "
                                  "send retrain: true to train it again with these, or use a new job_id")
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2, quantization_config=quantization_config(torch.float32),
                                                dtype=torch.float32)
    PeftModel.from_pretrained(base, result["output"]["adapter_path"])  # the final adapter loads


def test_planted_secrets_never_reach_a_log_an_output_or_a_file(tmp_path, storage, tiny_qwen2, s3):
    secrets = {"HF_TOKEN": "hf_plantedSecret0123456789", "S3_SECRET_ACCESS_KEY": S3_KEYS["S3_SECRET_ACCESS_KEY"]}
    callback_secret = "planted-callback-secret"
    env = {**secrets, "S3_ACCESS_KEY_ID": S3_KEYS["S3_ACCESS_KEY_ID"], "S3_ENDPOINT_URL": s3[0],
           "S3_BUCKET": "lora-models"}
    with running_worker(tmp_path, **env) as worker:
        result = runsync(worker, {
            "job_id": "secrets", "dataset_url": storage.url(SAMPLE.name, storage.good),
            "callback_url": f"http://127.0.0.1:9/cb?sig={callback_secret}",
            "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "max_seq_length": 256}})
    assert result["status"] == "COMPLETED", result
    # The presigned URLs in the output carry the access key id (an identifier, not a secret) by design.
    planted = [*secrets.values(), storage.good, callback_secret]
    texts = {"output": json.dumps(result), "worker log": worker.log.read_text()}
    for path in (tmp_path / "jobs").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 10
    for where, text in texts.items():
        for secret in planted:
            assert secret not in text, f"{secret} leaked into {where}"
