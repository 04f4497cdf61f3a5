"""The whole worker, through the RunPod SDK's local API server, over real HTTP, with real 4-bit layers."""

import math
from pathlib import Path

import pytest

from conftest import SAMPLE, free_port, running_worker, runsync

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with running_worker(tmp_path_factory.mktemp("worker")) as w:
        yield w


def test_job_trains_an_adapter_that_changes_the_model(worker, storage, tiny_qwen2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model_loading import quantization_config, same_kernels_in_eval

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
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "training_config.json", "metrics.json"):
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
    assert "name a Hugging Face Hub model as <org>/<name> to download it" in result["error"] and storage.hits[SAMPLE.name] == 0
    # a hub id that is not cached is looked up on the Hub (here: nothing answers) before the dataset is downloaded
    result = runsync(worker, {"job_id": "e2e-no-hub", "dataset_url": storage.url(SAMPLE.name, storage.good),
                              "hyperparameters": {"base_model": "someone/not-cached-7B"}})
    assert result["error"].startswith("loading_model: downloading base model 'someone/not-cached-7B' failed: ")
    assert storage.hits[SAMPLE.name] == 0
