"""RunPod serverless worker: a chat dataset in, a LoRA adapter out.

One job flows: validate the input → download the dataset → normalize it → train (4-bit QLoRA) →
deliver the adapter's files. Each step is a plain function in its own module; this file only calls
them in order, reports progress, and turns failures into `{"error": "<stage>: <what to do>"}`.

    python handler.py --test_input '{"input": {...}}'      # one job, locally
    python handler.py --rp_serve_api --rp_api_port 8000     # the SDK's local API server
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

# The runpod SDK logs every job's input and output at DEBUG, its default level: that would put signed
# dataset URLs and presigned download links in the worker's log. INFO unless the deployment says otherwise.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers thread pool

import runpod  # noqa: E402

from dataset_loader import DatasetError, load_dataset, write_jsonl  # noqa: E402
from job import JOB_ID_RULE, JobError, WorkerSettings, is_safe_job_id, parse_job_input, redact_text, redact_url  # noqa: E402
from storage import JobLock, download_dataset, post_callback, presigned_urls, upload_files  # noqa: E402
from base_models import resolve_base_model, trust_remote_code_for  # noqa: E402

log = logging.getLogger("worker")

# Overall progress (0..100) at the start of each stage; training fills the span up to "saving".
STAGE_START = {"downloading": 1, "loading_data": 4, "loading_model": 6, "training": 10, "saving": 95, "uploading": 97}


class RedactingFilter(logging.Filter):
    """No signed URL token reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = ()
        return True


class ProgressReporter:
    """Sends what the app polls (`progress`, `current_epoch`, `current_step`, `stage`, `metrics`) at each
    stage change and at most every `interval_s` seconds in between.

    The SDK posts progress to RUNPOD_WEBHOOK_POST_OUTPUT from a thread; where that is unset (a local
    run) there is nobody to tell, so nothing is sent.
    """

    METRICS = {"training_loss": "loss", "validation_loss": "validation_loss", "learning_rate": "learning_rate",
               "throughput": "tokens_per_second", "gpu_utilization": "gpu_utilization", "gradient_norm": "grad_norm"}

    def __init__(self, job: dict, enabled: bool, interval_s: float = 10.0):
        self.job, self.enabled, self.interval_s = job, enabled, interval_s
        self.on_event = lambda: None  # e.g. the job lock's heartbeat
        self.stage, self.last_sent = None, 0.0
        self.payload = {"progress": 0.0, "current_epoch": 0, "current_step": 0, "stage": None, "metrics": {}}

    def __call__(self, event: dict) -> None:
        self.on_event()
        stage = event.get("stage", self.stage)
        start, end = STAGE_START.get(stage, 0), STAGE_START["saving"]
        training = stage == "training" and "percent" in event
        metrics = {name: event[key] for name, key in self.METRICS.items() if event.get(key) is not None}
        self.payload = {
            "progress": round(start + (end - start) * event["percent"] / 100 if training else start, 1),
            "current_epoch": event.get("epoch", self.payload["current_epoch"]),
            "current_step": event.get("step", self.payload["current_step"]),
            "stage": stage,
            "metrics": {**self.payload["metrics"], **metrics},
        }
        now = time.monotonic()
        if stage != self.stage or now - self.last_sent >= self.interval_s:
            self.stage, self.last_sent = stage, now
            log.info("progress %s %.1f%% step %s", stage, self.payload["progress"], self.payload["current_step"])
            if self.enabled:
                runpod.serverless.progress_update(self.job, self.payload)


def _job_log(job_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(job_dir / "job.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return handler


@contextmanager
def _stage(name: str, progress: "ProgressReporter | None" = None):
    """Announce a stage; label the expected failures raised inside it with its name."""
    if progress:
        progress({"stage": name})
    try:
        yield
    except JobError as exc:
        exc.stage = exc.stage or name
        raise
    except DatasetError as exc:
        raise JobError(str(exc), stage=name) from None


def run_job(job: dict, settings: WorkerSettings, progress: ProgressReporter) -> dict:
    """The job's steps in order. Raises JobError (expected) or anything else (a bug)."""
    spec, warnings = parse_job_input(job.get("input"))
    job_id = spec.job_id or str(job.get("id") or "")
    if not is_safe_job_id(job_id):
        raise JobError(f"invalid job input: job id {job_id!r} {JOB_ID_RULE}")
    hp = spec.hyperparameters
    base_model = hp.base_model or settings.default_base_model
    job_dir = settings.jobs_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    lock = JobLock(job_dir / "job.lock")
    with _stage("starting"):
        lock.acquire()
    progress.on_event = lock.heartbeat
    file_log = _job_log(job_dir)
    seconds: dict[str, float] = {}
    started = time.monotonic()
    try:
        stored = job_dir / "result.json"
        # What makes two submissions the same job: the settings and the dataset's location (a new
        # signed URL for the same file is the same dataset), not the signature, callback or GPU request.
        input_fingerprint = hashlib.sha256(json.dumps(
            [hp.model_dump(mode="json"), base_model, redact_url(spec.dataset_url)], sort_keys=True).encode()).hexdigest()
        if spec.retrain:
            stored.unlink(missing_ok=True)
            shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        elif stored.is_file():
            return _stored_result(stored, job_id, input_fingerprint, settings)
        with _stage("loading_model"):  # fail in seconds, before any download, when the model is not there
            base_path = resolve_base_model(base_model, [settings.model_cache_dir, Path("/workspace/models")],
                                           allow_download=settings.allow_model_download, hf_token=settings.hf_token,
                                           allowed=settings.allowed_base_models)
        log.info("job %s: base model %s (%s), dataset %s", job_id, base_model, base_path, redact_url(spec.dataset_url))
        with _stage("downloading", progress), _timed(seconds, "download"):
            download = download_dataset(
                spec.dataset_url, job_dir / "dataset.download", max_bytes=settings.max_dataset_bytes,
                timeout=settings.download_timeout_s, retries=settings.download_retries,
                allow_file_urls=settings.allow_file_urls,
            )
        with _stage("loading_data", progress):
            conversations, report = load_dataset(download.path, max_invalid_fraction=spec.max_invalid_fraction)
            write_jsonl(conversations, job_dir / "dataset.canonical.jsonl")
        log.info("dataset: %d bytes, sha256 %s; %d examples %s, %d skipped, %d invalid, %d duplicates",
                 download.bytes, download.sha256, report.examples, dict(report.formats), report.skipped,
                 report.invalid, report.duplicates)

        import train_lora  # torch, transformers and bitsandbytes load here, on the first job

        adapter_dir = job_dir / "adapter"
        fingerprint = hashlib.sha256(json.dumps([hp.model_dump(mode="json"), download.sha256, str(base_path)],
                                                sort_keys=True).encode()).hexdigest()
        with _stage("training"), _timed(seconds, "training"):
            metrics = train_lora.train(conversations, base_path, adapter_dir, hp, on_progress=progress,
                                       trust_remote_code=trust_remote_code_for(base_model, settings.remote_code_models),
                                       checkpoint_dir=job_dir / "checkpoints", fingerprint=fingerprint,
                                       quantized_cache=settings.quantized_cache).metrics
        warnings += _gpu_warnings(spec.gpu_config)
        files = sorted(p for p in adapter_dir.iterdir() if p.is_file())
        if settings.s3_configured:
            with _stage("uploading", progress), _timed(seconds, "upload"):
                model_files = upload_files(files, job_id, settings)
        else:
            model_files = {p.name: p.resolve().as_uri() for p in files}
            warnings.append(f"no S3 storage is configured (S3_ENDPOINT_URL, S3_BUCKET): the adapter's files stay on the volume at {adapter_dir}")
        seconds["job"] = time.monotonic() - started
        result = {
            "model_files": model_files,
            "model_metadata": {
                "base_model": base_model, "base_model_path": str(base_path),
                "lora": {"rank": hp.lora_rank, "alpha": hp.effective_lora_alpha, "dropout": hp.lora_dropout,
                         "target_modules": hp.lora_target_modules},
                "final_loss": metrics["train_loss_last"], "validation_loss": metrics["validation_loss"],
                "seconds": {k: round(v, 2) for k, v in seconds.items()},
                "gpu_config": spec.gpu_config.model_dump() if spec.gpu_config else None,
                "device": metrics["device"],
                "dataset": {"bytes": download.bytes, "sha256": download.sha256, "examples": report.examples,
                            "formats": dict(report.formats), "skipped": report.skipped, "invalid": report.invalid},
            },
            "metrics": metrics,
            "adapter_path": str(adapter_dir),
            "dataset_report": report.to_dict(),
            "warnings": warnings + report.warnings + metrics["checkpoint_warnings"],
        }
        _write_json_atomically(stored, {"input_fingerprint": input_fingerprint, "result": result})
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # the adapter is complete: checkpoints are spent
        return result
    except Exception:
        log.error("job %s failed in %s:\n%s", job_id, progress.stage, redact_text(traceback.format_exc()))
        raise
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        lock.release()


def _stored_result(stored: Path, job_id: str, input_fingerprint: str, settings: WorkerSettings) -> dict:
    """The result of this job's earlier, completed run, with fresh download links."""
    saved = json.loads(stored.read_text())
    if saved.get("input_fingerprint") != input_fingerprint:
        raise JobError(f"job {job_id} already completed with other settings or another dataset: send retrain: true to "
                       "train it again with these, or use a new job_id", stage="starting")
    result = saved["result"]
    if settings.s3_configured and all(u.startswith(("http://", "https://")) for u in result["model_files"].values()):
        result["model_files"] = presigned_urls(list(result["model_files"]), job_id, settings)
    result["warnings"] = result.get("warnings", []) + [
        f"job {job_id} had already completed: this is its stored result (send retrain: true to train again)"]
    log.info("job %s already completed; returning its stored result", job_id)
    return result


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextmanager
def _timed(seconds: dict, name: str):
    t0 = time.monotonic()
    try:
        yield
    finally:
        seconds[name] = time.monotonic() - t0


def _gpu_warnings(gpu_config) -> list[str]:
    import torch

    seen = torch.cuda.device_count()
    if gpu_config is None or gpu_config.count == max(seen, 1) and seen:
        return []
    used = f"{seen} GPU(s)" if seen else "the CPU (no GPU visible)"
    return [f"gpu_config asked for {gpu_config.count} GPU(s); this worker trained on {used}"]


def handler(job: dict) -> dict:
    """RunPod entry point: the job's result, or {"error": "<stage>: <message>"}."""
    try:
        settings = WorkerSettings.from_env(os.environ)
    except JobError as exc:
        return {"error": f"worker settings: {exc}. Fix the endpoint's environment variables"}
    progress = ProgressReporter(job, enabled=bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT")),
                                interval_s=settings.progress_interval_s)
    try:
        result = run_job(job, settings, progress)
    except JobError as exc:
        result = {"error": redact_text(str(exc))}
    except Exception as exc:  # a bug: the job's log has the traceback; give the user the job id to report
        log.error("internal error in job %s:\n%s", job.get("id"), redact_text(traceback.format_exc()))
        result = {"error": f"{progress.stage or 'validating'}: internal error ({type(exc).__name__}: {redact_text(str(exc))}) "
                           f"in job {job.get('id')}. Retry once; if it fails again, report the job id"}
    callback = (job.get("input") or {}).get("callback_url") if isinstance(job.get("input"), dict) else None
    if isinstance(callback, str) and callback:
        status = "FAILED" if "error" in result else "COMPLETED"
        post_callback(callback, {"id": job.get("id"), "status": status, **({"error": result["error"]} if "error" in result else {"output": result})})
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for h in logging.getLogger().handlers:
        h.addFilter(RedactingFilter())
    runpod.serverless.start({"handler": handler})
