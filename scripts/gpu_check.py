"""The GPU check: one command that says whether this worker trains right and how fast on a GPU machine.

    make gpu-check                                   # = .venv/bin/python scripts/gpu_check.py
    python scripts/gpu_check.py --config mistral-7b-v0.1 --json /tmp/check.json

1. prints the GPU(s), the driver, CUDA (torch's build and the driver's), torch, bitsandbytes, transformers, peft
   and triton versions;
2. runs `pytest -m gpu tests/test_gpu.py` with the GPUs visible (GPU_CHECK_VISIBLE_DEVICES: this process's
   CUDA_VISIBLE_DEVICES, or every GPU): flex attention's backward against sdpa's with the packed mask, 4-bit
   training in bf16 and fp16, the kept 4-bit copy reloaded on the GPU, two ranks over NCCL (with 2 GPUs);
3. runs one complete job through the handler (`handler.handler`, in this process, with local settings: job and
   model directories under a temporary directory, no Supabase, no S3, no volume delivery, KEEP_QUANTIZED_BASE as
   deployed) on a 7B-sized model built from `data/model-configs/<config>.json` with random weights (no download;
   the tiny model's tokenizer), the bundled sample, the worker's defaults otherwise (packing, precision, attention,
   recomputation "auto"); then prints the figures of the benchmark runbook (docs/BENCHMARKS.md):
   - time to first step: from the handler's call to the end of step 1 (input checks, dataset, labelling, loading
     and quantizing the 7B base, step 1 with its compiles);
   - tokens/s: real tokens (padding excluded) per second over the steady steps, each step's own time as the
     trainer records it (forward, backward, all-reduce, optimizer step; never the evaluation), without step 1 and
     without each epoch's last step (a short batch, compiled apart); and the job's own figure (every step,
     compiles and evaluations included);
   - peak memory per GPU (`torch.cuda.max_memory_allocated`, from the model's load to the end);
   - MFU: 6·N·tokens/s over the GPUs' peak dense bf16 FLOPS (N: the parameters less the input embedding; the peak
     from the table below by GPU name, else "unknown"), beside a bf16 matmul peak measured here for reference.

Writes the figures to bench/results/gpu-check-<date>.json (--json elsewhere). Exit status: 0 every part passed,
1 a part failed (the JSON says which), 2 no CUDA GPU visible (nothing run, nothing written). Meant to take under
8 minutes on one H100 (the tests about 4, the job about 3, mostly building, loading and compiling).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# torch, pynvml and the project's modules (handler, tiny_model, bench/measure) are imported inside the functions that
# use them: the project's modules once ROOT is on sys.path and the job's environment is set (handler reads it when
# imported), torch after the check that there is a GPU to use.

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"
CONFIGS = ROOT / "data" / "model-configs"
NO_GPU = 2

# Peak dense (no sparsity) bf16 tensor-core TFLOPS from NVIDIA's data sheets, by a part of the device name; the
# first match wins (the PCIe and NVL boards of the H100/H200 run lower clocks than the SXM ones).
PEAK_BF16_TFLOPS = [
    ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("A40", 149.7),
]

# Worker settings that would send the job's files or row elsewhere: the check keeps everything local.
NOT_LOCAL = ("RUNPOD_ENDPOINT_ID", "RUNPOD_WEBHOOK_POST_OUTPUT", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
             "S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL", "S3_BUCKET", "BUCKET_NAME", "S3_ACCESS_KEY_ID",
             "BUCKET_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY", "VOLUME_DELIVERY")


def peak_bf16_tflops(name: str) -> float | None:
    upper = name.upper()
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS if part in upper), None)


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------- 1. versions

def versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "driver": None, "cuda_driver": None}
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "triton", "flash_attn"):
        try:
            info[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            info[name] = None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            info["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: nvidia-smi, or nothing
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    info["compiler"] = shutil.which("cc") or shutil.which("gcc")  # flex attention's Triton kernels need one
    return info


def print_versions(info: dict) -> None:
    say("== versions")
    for i, gpu in enumerate(info["gpus"]):
        peak = peak_bf16_tflops(gpu)
        say(f"GPU {i}:        {gpu} (compute capability {info['capability']}; peak dense bf16 "
            f"{f'{peak:g} TFLOPS' if peak else 'unknown'})")
    say(f"driver:       {info['driver'] or 'unknown'} (CUDA {info['cuda_driver'] or 'unknown'} by the driver)")
    say(f"CUDA (torch): {info['cuda_build']}")
    say(f"torch:        {info['torch']}    bitsandbytes: {info['bitsandbytes']}    "
        f"transformers: {info['transformers']}    peft: {info['peft']}")
    say(f"triton:       {info['triton']}    flash_attn: {info['flash_attn']}    C compiler: {info['compiler']}    "
        f"python: {info['python']}")


# ---------------------------------------------------------------------------- 2. the GPU tests

def run_gpu_tests(timeout_s: float) -> dict:
    import torch

    devices = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(torch.cuda.device_count()))
    say(f"\n== pytest -m gpu tests/test_gpu.py (GPU_CHECK_VISIBLE_DEVICES={devices})")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-pytest-") as tmp:
        report = Path(tmp) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs", "--durations=0",
                   "tests/test_gpu.py", f"--junitxml={report}"]
        try:
            run = subprocess.run(command, cwd=ROOT, env={**os.environ, "GPU_CHECK_VISIBLE_DEVICES": devices},
                                 timeout=timeout_s)
            returncode = run.returncode
        except subprocess.TimeoutExpired:
            returncode = None
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        skipped = []
        if report.is_file():
            root = ElementTree.parse(report).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in counts}
            skipped = [f"{case.get('name')}: {s.get('message')}" for case in suite.iter("testcase")
                       for s in case.findall("skipped")]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = returncode == 0 and passed > 0 and not counts["failures"] and not counts["errors"]
    result = {"ok": ok, "returncode": returncode, "passed": passed, **counts, "skipped_why": skipped,
              "seconds": round(time.monotonic() - started, 1), "visible_devices": devices}
    if returncode is None:
        result["problem"] = f"the GPU tests ran past {timeout_s:g} s"
    elif not ok and passed == 0 and not counts["failures"] and not counts["errors"]:
        result["problem"] = "no GPU test ran (all skipped or none collected): see the reasons above"
    return result


# ---------------------------------------------------------------------------- 3. one job through the handler

def build_model(config_name: str, work: Path) -> Path:
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from measure import build_random_model
    from tiny_model import build_tiny_model

    config = Path(config_name) if config_name.endswith(".json") else CONFIGS / f"{config_name}.json"
    tiny = build_tiny_model("qwen2", work / "tiny-qwen2")
    return build_random_model(config, tiny, work / config.stem)


def steady_tokens_per_second(history: list[dict], steps_per_epoch: int) -> tuple[float | None, int]:
    """Real tokens over the steps' own seconds (the trainer's per-step figure), without step 1 and each epoch's last."""
    steady = [r for r in history if r["step"] > 1 and r["step"] % steps_per_epoch != 0 and r.get("tokens_per_second")]
    seconds = sum(r["real_tokens"] / r["tokens_per_second"] for r in steady)
    return (sum(r["real_tokens"] for r in steady) / seconds if seconds > 0 else None), len(steady)


def run_job(args, work: Path, gpu_names: list[str]) -> dict:
    say(f"\n== one job through the handler: {args.config} with random weights, the bundled sample")
    started = time.monotonic()
    model = build_model(args.config, work)
    built_s = time.monotonic() - started
    say(f"built {model.name} from its config in {built_s:.0f} s")
    for name in NOT_LOCAL:
        os.environ.pop(name, None)
    os.environ.update({"JOBS_DIR": str(work / "jobs"), "MODEL_CACHE_DIR": str(work / "models"),
                       "TOKENIZERS_PARALLELISM": "false"})
    sys.path.insert(0, str(ROOT))
    import handler

    first_step: list[float] = []

    class Stamped(handler.ProgressReporter):  # the end of step 1, as the job reports it
        def __call__(self, event: dict) -> None:
            if not first_step and event.get("stage") == "training" and "loss" in event:
                first_step.append(time.monotonic())
            super().__call__(event)

    handler.ProgressReporter = Stamped
    job_id = f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    job = {"id": job_id, "input": {
        "job_id": job_id, "retrain": True, "dataset_url": SAMPLE.as_uri(),
        "hyperparameters": {"base_model": str(model), "epochs": args.epochs, "batch_size": args.batch_size,
                            "max_seq_length": args.max_seq_length, "rank": 16, "alpha": 32},
        "gpu_config": {"type": gpu_names[0], "count": len(gpu_names)}}}
    called = time.monotonic()
    output = handler.handler(job)
    job_s = time.monotonic() - called
    if "error" in output:
        return {"ok": False, "problem": output["error"], "job_seconds": round(job_s, 1), "model": model.name}
    first_step_s = round(first_step[0] - called, 1) if first_step else None
    return job_figures(output, model, gpu_names, {"build_seconds": round(built_s, 1), "job_seconds": round(job_s, 1),
                                                  "first_step_seconds": first_step_s})


def job_figures(output: dict, model: Path, gpu_names: list[str], seconds: dict) -> dict:
    """The runbook's figures of a finished job: throughput (steady state), MFU, memory, losses, the plan."""
    import torch

    metrics = output["metrics"]
    adapter = Path(output["adapter_path"])
    history = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    plan = json.loads((adapter / "training_config.json").read_text())["plan"]
    steady, steady_steps = steady_tokens_per_second(history, plan["steps_per_epoch"])
    from measure import matmul_peak_tflops, model_flops_parameters

    n = model_flops_parameters(model)
    world = metrics["world_size"]
    peaks = [peak_bf16_tflops(name) for name in gpu_names[:world]]
    peak = sum(peaks) if all(peaks) else None
    tokens_per_second = steady or metrics["tokens_per_second"]
    torch.cuda.empty_cache()
    figures = {
        "ok": True, "model": model.name, "parameters_n": n, **seconds,
        "tokens_per_second": tokens_per_second, "tokens_per_second_steps": steady_steps,
        "tokens_per_second_job": metrics["tokens_per_second"],
        "peak_memory_gb_per_gpu": metrics["peak_memory_gb_per_gpu"],
        "peak_bf16_tflops_per_gpu": peaks[0] if all(peaks) else None,
        "mfu": 6 * n * tokens_per_second / (peak * 1e12) if peak else None,
        "bf16_matmul_peak_tflops_measured": matmul_peak_tflops(),
        "steps": metrics["steps"], "epochs": metrics["epochs"], "world_size": world, "tokens": metrics["tokens"],
        "token_efficiency": metrics["token_efficiency"], "train_loss_first": metrics["train_loss_first"],
        "train_loss_last": metrics["train_loss_last"], "validation_loss": metrics["validation_loss"],
        "load_seconds": metrics["load_seconds"], "train_seconds": metrics["train_seconds"],
        "base_weights": metrics["base_weights"], "attention": metrics["attention"],
        "compute_dtype": metrics["compute_dtype"], "gradient_checkpointing": metrics["gradient_checkpointing"],
        "recomputation": metrics["recomputation"], "plan": plan, "stage_seconds": output["model_metadata"]["seconds"],
        "warnings": output["warnings"],
    }
    finite = all(math.isfinite(r["loss"]) for r in history)
    if not finite:
        figures.update(ok=False, problem="a training loss was not finite")
    return figures


def print_figures(job: dict) -> None:
    say("\n== figures (docs/BENCHMARKS.md, GPU runbook)")
    if not job.get("ok") and "tokens_per_second" not in job:
        say(f"the job FAILED: {job.get('problem')}")
        return
    peak = job["peak_bf16_tflops_per_gpu"]
    say(f"model:               {job['model']} (N = {job['parameters_n'] / 1e9:.2f}B without the input embedding), "
        f"{job['world_size']} GPU(s), {job['compute_dtype']}, attention {job['attention']}, "
        f"micro-batch {job['plan']['micro_batch_size']} x {job['plan']['accumulation_steps']}, "
        f"recomputation {'on' if job['gradient_checkpointing'] else 'off'} ({job['recomputation']})")
    say(f"time to first step:  {job['first_step_seconds']} s (from the handler's call; the 4-bit base "
        f"{job['base_weights']})")
    say(f"tokens/s:            {job['tokens_per_second']:.0f} real tokens/s over "
        f"{job['tokens_per_second_steps']} steady steps; {job['tokens_per_second_job']:.0f} over the whole "
        "training stage")
    say(f"peak memory per GPU: {', '.join(f'{gb:.2f} GB' for gb in job['peak_memory_gb_per_gpu'])}")
    mfu = (f"{job['mfu']:.1%} (6·N·tokens/s over {peak:g} TFLOPS a GPU)" if job["mfu"] is not None
           else "unknown (GPU not in the table)")
    measured = job["bf16_matmul_peak_tflops_measured"]
    say(f"MFU:                 {mfu}" + (f"; a bf16 matmul measured here: {measured:.0f} TFLOPS" if measured else ""))
    say(f"job:                 {job['steps']} steps, {job['epochs']} epoch(s), loss {job['train_loss_first']:.3f} -> "
        f"{job['train_loss_last']:.3f}, {job['job_seconds']} s in the handler "
        f"(+{job['build_seconds']} s building the model)")


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2.5-7b",
                        help="model config in data/model-configs/ (name or a .json path)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests")
    parser.add_argument("--skip-job", action="store_true", help="do not run the 7B job")
    parser.add_argument("--tests-timeout", type=float, default=420, help="seconds the GPU tests may take")
    parser.add_argument("--work-dir", default=None,
                        help="where the model and the job go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="figures file (default bench/results/gpu-check-<date>.json)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        say(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): nothing was run. "
            "Run it on a GPU machine; until then every GPU figure stays \"not yet measured\".")
        return NO_GPU
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = time.monotonic()
    info = versions()
    print_versions(info)
    results = {"date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S %Z"), "versions": info,
               "settings": {"config": args.config, "epochs": args.epochs, "batch_size": args.batch_size,
                            "max_seq_length": args.max_seq_length}}
    if not args.skip_tests:
        results["tests"] = run_gpu_tests(args.tests_timeout)
    if not args.skip_job:
        work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            results["job"] = run_job(args, work, info["gpus"])
        except Exception as exc:  # noqa: BLE001 - a failed part is reported, the others still count
            logging.exception("the job failed")
            results["job"] = {"ok": False, "problem": f"{type(exc).__name__}: {exc}"}
        finally:
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
        print_figures(results["job"])
    results["seconds"] = round(time.monotonic() - started, 1)
    failed = [part for part in ("tests", "job") if part in results and not results[part]["ok"]]
    results["ok"] = not failed
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"gpu-check-{results['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    if "tests" in results:
        t = results["tests"]
        say(f"\nGPU tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped "
            f"({t['seconds']} s){'; ' + t['problem'] if t.get('problem') else ''}")
    say(f"gpu_check {'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} "
        f"in {results['seconds']:.0f} s -> {out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
