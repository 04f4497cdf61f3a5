"""Generate the README's input and settings tables, the jobs `test_input.json` (the local smoke test that
`python handler.py` runs) and `app_job.example.json` (what the BrightRun app sends), and the RunPod Hub
files, from their single sources: the fields of two pydantic models, `job.JobInput` and
`settings.WorkerSettings`. `tests/test_docs.py` fails when they are out of date.

    python scripts/gen_docs.py          # rewrite them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from job import GpuConfig, Hyperparameters, JobInput  # noqa: E402
from settings import WorkerSettings  # noqa: E402

README = ROOT / "README.md"
TEST_INPUT = ROOT / "test_input.json"
APP_JOB = ROOT / "app_job.example.json"
# RunPod's allowedCudaVersions (the host driver's CUDA version): the image's torch is PyTorch's CUDA 12.6 build
# (2.13.0+cu126, Dockerfile), which needs a driver >= 560 (CUDA 12.6) and runs on every newer one: all the values
# RunPod offers from 12.6 up (its API's list ends at 13.0), none below.
CUDA_VERSIONS = ["12.6", "12.7", "12.8", "12.9", "13.0"]
HUB_JSON = ROOT / ".runpod" / "hub.json"
TESTS_JSON = ROOT / ".runpod" / "tests.json"


def _limits(info) -> str:
    bounds = {attr: getattr(m, attr) for m in info.metadata for attr in ("ge", "gt", "le", "lt") if hasattr(m, attr)}
    low = f"≥ {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}" if "gt" in bounds else ""
    high = f"≤ {bounds['le']}" if "le" in bounds else f"< {bounds['lt']}" if "lt" in bounds else ""
    return ", ".join(x for x in (low, high) if x)


def _default(info) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "{}"
    return "—" if info.default is None else f"`{json.dumps(info.default)}`"


def input_table() -> str:
    rows = ["| field | also accepted as | default | limits | meaning |", "|---|---|---|---|---|"]
    for prefix, model in (("", JobInput), ("hyperparameters.", Hyperparameters), ("gpu_config.", GpuConfig)):
        for name, info in model.model_fields.items():
            if name in ("hyperparameters", "gpu_config"):
                continue
            aliases = [a for a in getattr(info.validation_alias, "choices", []) if a != name]
            alias = ", ".join(f"`{prefix}{a}`" for a in aliases)
            rows.append(f"| `{prefix}{name}` | {alias} | {_default(info)} | {_limits(info)} | {info.description} |")
    return "\n".join(rows)


def _value_type(info) -> type:
    """A setting's type without its None and its validators: `EnvInt | None` is int."""
    kinds = get_args(info.annotation) if get_origin(info.annotation) in (Union, UnionType) else (info.annotation,)
    [kind] = [k for k in kinds if k is not NoneType]
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def settings_table() -> str:
    rows = ["| variable | also read from | default | meaning |", "|---|---|---|---|"]
    for name, info in WorkerSettings.model_fields.items():
        variable, *aliases = WorkerSettings.env_names(name)
        default = "unset" if info.default is None else f"`{info.default}`"
        also = ", ".join(f"`{a}`" for a in aliases)
        rows.append(f"| `{variable}` | {also} | {default} | {info.description} |")
    return "\n".join(rows)


def example_job() -> dict:
    """`python handler.py`'s smoke test (the runpod SDK runs test_input.json when started locally): the
    bundled sample, read as a file relative to the checkout, on the tiny random model the worker builds."""
    job = {"input": {
        "job_id": "local-smoke-test",
        "retrain": True,  # train each time, rather than return the stored result of the last run
        "dataset_url": "file:data/brightrun-eq12-demo.jsonl",
        "hyperparameters": {"base_model": "tiny-random/qwen2", "max_steps": 5, "max_seq_length": 512},
    }}
    JobInput.model_validate(job["input"])
    return job


def app_job() -> dict:
    """What the BrightRun app's deployed (pipeline) flow POSTs to /run: its row's id as job_id, a dataset signed for 1
    hour in bucket training-files, Mistral-7B-Instruct-v0.2 (its inference endpoint's base), the row's default GPU;
    validated by the model before it is written (shared/contracts/brightrun-app.md)."""
    job = {"input": {
        "job_id": "5b0f3c8e-2d7a-4c1e-9f6b-1a2b3c4d5e6f",
        "dataset_url": ("https://PROJECT.supabase.co/storage/v1/object/sign/training-files/USER/dataset.jsonl"
                        "?token=SIGNED_JWT"),
        "hyperparameters": {"base_model": "mistralai/Mistral-7B-Instruct-v0.2", "learning_rate": 0.0001,
                            "batch_size": 4, "epochs": 3, "rank": 16, "alpha": 32, "dropout": 0.05},
        "gpu_config": {"type": "NVIDIA A40", "count": 1},
    }}
    JobInput.model_validate(job["input"])
    return job


def hub_json() -> dict:
    """RunPod Hub listing: every worker setting is an env input, with its default and help."""
    env = []
    for name, info in WorkerSettings.model_fields.items():
        if name == "runpod_endpoint_id":  # RunPod sets it on every endpoint worker
            continue
        variable, kind = WorkerSettings.env_names(name)[0], _value_type(info)
        kind_name = "boolean" if kind is bool else "number" if kind in (int, float) else "string"
        entry = {"name": variable, "type": kind_name, "description": info.description}
        if info.default is not None:
            entry["default"] = info.default if kind in (bool, int, float) else str(info.default)
        env.append({"key": variable, "input": entry})
    return {
        "title": "BrightRun LoRA trainer",
        "description": ("QLoRA fine-tuning of chat adapters (Qwen, Mistral) from BrightRun, OpenAI, ShareGPT or "
                        "Alpaca datasets"),
        "type": "serverless", "category": "language",
        "config": {"runsOn": "GPU", "containerDiskInGb": 30, "gpuCount": 1, "gpuIds": "AMPERE_80,ADA_80_PRO,HOPPER_141",
                   "allowedCudaVersions": CUDA_VERSIONS, "presets": [], "env": env},
    }


def tests_json() -> dict:
    """A smoke test of a built image: the bundled sample, the tiny random model built in the container; the
    adapter stays on the volume (a test endpoint has no S3 storage)."""
    job = {"job_id": "hub-smoke-test", "dataset_url": "file:///app/data/brightrun-eq12-demo.jsonl",
           "hyperparameters": {"base_model": "tiny-random/qwen2", "max_steps": 5, "max_seq_length": 512}}
    JobInput.model_validate(job)
    return {"tests": [{"name": "tiny_model_trains_on_the_bundled_sample", "input": job, "timeout": 600000}],
            "config": {"gpuTypeId": "NVIDIA A100 80GB PCIe", "gpuCount": 1, "allowedCudaVersions": CUDA_VERSIONS,
                       "env": [{"key": "VOLUME_DELIVERY", "value": "true"},
                               {"key": "JOBS_DIR", "value": "/tmp/lora-jobs"},
                               {"key": "MODEL_CACHE_DIR", "value": "/tmp/models"}]}}


def render_readme(text: str) -> str:
    for marker, table in (("job-input", input_table()), ("worker-settings", settings_table())):
        begin, end = f"<!-- BEGIN {marker} (generated by scripts/gen_docs.py) -->", f"<!-- END {marker} -->"
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{table}\n{end}{tail}"
    return text


def main() -> int:
    README.write_text(render_readme(README.read_text()))
    TEST_INPUT.write_text(json.dumps(example_job(), indent=2) + "\n")
    APP_JOB.write_text(json.dumps(app_job(), indent=2) + "\n")
    HUB_JSON.parent.mkdir(exist_ok=True)
    HUB_JSON.write_text(json.dumps(hub_json(), indent=2) + "\n")
    TESTS_JSON.write_text(json.dumps(tests_json(), indent=2) + "\n")
    print("wrote the README tables, test_input.json, app_job.example.json and .runpod/{hub,tests}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
