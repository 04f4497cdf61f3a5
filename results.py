"""The job's result: the adapter delivered as the deployment delivers it, the result assembled and stored beside the
job, a completed job's stored result returned again to a resubmission, the app row's last word, and the output made
sendable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from app_row import WORKER, JobRow
from archive import build_archive, signed_url, upload_archive
from checkpoints import Cancelled
from dataset_loader import Report
from files import write_atomically
from job import MAX_MESSAGE_CHARS, JobError, redact_text
from progress import ProgressReporter, in_stage, stopped_by_app, timed
from settings import WorkerSettings
from storage import Download, presigned_urls, upload_files

log = logging.getLogger("worker")

# The app's function that copies the adapter buffers each file whole in a Supabase Edge Function (256 MB
# of memory, its own runtime included): files above this are likely to fail there.
APP_FILE_WARN_BYTES = 200 * 1024**2
MAX_RESULT_BYTES = 1_000_000  # a job's output as JSON; the SDK refuses about 20 MB, and the app reads it whole
STOPPED_FINAL_DEADLINE_S = 20.0  # after SIGTERM the container is killed soon: the failed row gets this long


@dataclass(frozen=True)
class Prepared:
    """What training starts from, once every check passed and both downloads are in (the result reports it)."""

    base_model: str  # as the job named it
    base_path: Path  # its weights on this worker
    trust_remote_code: bool
    processes: int  # training ranks
    download: Download  # the dataset file
    conversations: list
    report: Report  # the loader's per-line report
    adapter_dir: Path  # where training writes the adapter


def deliver(files: list[Path], job_id: str, adapter_dir: Path, settings: WorkerSettings,
            progress: ProgressReporter | None, seconds: dict) -> dict:
    """The adapter delivered as the deployment delivers it: as one archive (`<job_id>.tar.gz`, `adapter/` inside) in the
    app's Supabase Storage (the pipeline flow), and its files and the archive as presigned URLs (S3), the volume's
    paths (VOLUME_DELIVERY) or file:// URLs (a local run). Returns `adapter_archive`, `model_files` or `volume_files`
    (none with Supabase alone), and `warnings`."""
    if progress is not None and progress.row is not None and progress.row.stopped_by:
        raise Cancelled(f"{stopped_by_app(progress.row)} after training; nothing was uploaded")
    with in_stage("uploading", progress, announce=settings.s3_configured or settings.supabase_configured), \
            timed(seconds, "upload"):
        archive = build_archive(adapter_dir, adapter_dir.parent / f"{job_id}.tar.gz")
        described = {**archive.describe(), "volume_path": str(archive.path.resolve())}
        if settings.supabase_configured:
            described["storage_path"] = upload_archive(archive, settings, job_id)
            described["url"] = signed_url(settings, job_id, settings.presigned_url_expiry_s)
        if settings.s3_configured:
            links = upload_files([*files, archive.path], job_id, settings)
            described.setdefault("url", links.pop(archive.path.name))
            return {"adapter_archive": described, "model_files": links, "warnings": []}
    if settings.volume_delivery:
        return {"adapter_archive": described, "volume_files": {p.name: str(p.resolve()) for p in files},
                "warnings": [f"VOLUME_DELIVERY: the adapter's files are on the network volume at {adapter_dir} "
                             "(volume_files); no download links were made"]}
    if settings.supabase_configured:
        return {"adapter_archive": described, "warnings": []}
    described.setdefault("url", archive.path.resolve().as_uri())
    return {"adapter_archive": described, "model_files": {p.name: p.resolve().as_uri() for p in files},
            "warnings": [f"no S3 storage is configured (S3_ENDPOINT_URL, S3_BUCKET): the adapter's files stay on this "
                         f"machine at {adapter_dir} (a local run)"]}


def job_result(spec, prepared: Prepared, metrics: dict, files: list[Path], delivery: dict, seconds: dict,
               warnings: list[str], settings: WorkerSettings) -> dict:
    """The result of a job that trained: the delivery's fields, what was trained and how, and every warning."""
    hp, download, report = spec.hyperparameters, prepared.download, prepared.report
    warnings = warnings + gpu_warnings(spec.gpu_config, metrics) + large_file_warnings(files) + delivery.pop("warnings")
    warnings += settings.warnings(os.environ)
    return {
        **delivery,
        "model_metadata": {
            "base_model": prepared.base_model, "base_model_path": str(prepared.base_path),
            "lora": {"rank": hp.lora_rank, "alpha": hp.effective_lora_alpha, "dropout": hp.lora_dropout,
                     "target_modules": hp.lora_target_modules},
            "final_loss": metrics["train_loss_kept"], "validation_loss": metrics["validation_loss"],
            "files": {p.name: p.stat().st_size for p in files},
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "gpu_config": spec.gpu_config.model_dump() if spec.gpu_config else None,
            "device": metrics["device"],
            "dataset": {"bytes": download.bytes, "sha256": download.sha256, "examples": report.examples,
                        "formats": dict(report.formats), "skipped": report.skipped, "invalid": report.invalid},
        },
        "metrics": metrics,
        "adapter_path": str(prepared.adapter_dir),
        "dataset_report": {**report.to_dict(), "chat_format": metrics["chat_format"]},
        "warnings": warnings + report.warnings + metrics["warnings"],
    }


def store_result(job_dir: Path, input_fingerprint: str, result: dict) -> None:
    """`result.json` beside the job, for a resubmission; the checkpoints are spent once the adapter is complete."""
    write_atomically(job_dir / "result.json",
                     json.dumps(sendable({"input_fingerprint": input_fingerprint, "result": result}), indent=2))
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)


def previous_result(spec, job_dir: Path, job_id: str, input_fingerprint: str, settings: WorkerSettings,
                    warnings: list[str]) -> dict | None:
    """The result a completed job stored (or its refusal, for other settings); None when the job is to run."""
    stored = job_dir / "result.json"
    if spec.retrain:
        stored.unlink(missing_ok=True)
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        return None
    if not stored.is_file():
        return None
    try:
        saved = json.loads(stored.read_text())
    except (OSError, ValueError):  # empty or cut short (a crash mid-write): set aside, never a wedged job id
        aside = stored.with_name(f"result.json.bad-{int(time.time())}")
        os.replace(stored, aside)
        warnings.append(f"the stored result of job {job_id} could not be read; it was set aside as {aside.name} "
                        "and the job runs again")
        return None
    return _stored_result(saved, job_id, input_fingerprint, settings)


def _stored_result(saved: dict, job_id: str, input_fingerprint: str, settings: WorkerSettings) -> dict:
    """The result of this job's earlier, completed run, delivered as this deployment delivers: the adapter still on the
    volume delivered again (uploaded, or its paths with VOLUME_DELIVERY), else fresh presigned links for the files
    uploaded then."""
    if saved.get("input_fingerprint") != input_fingerprint:
        raise JobError(f"job {job_id} already completed with other settings or another dataset: send retrain: true to "
                       "train it again with these, or use a new job_id", stage="starting")
    result = saved["result"]
    links = result.pop("model_files", None) or {}
    result.pop("volume_files", None)
    adapter = Path(result["adapter_path"])
    files = sorted(p for p in adapter.iterdir() if p.is_file()) if adapter.is_dir() else []
    if files:  # delivered again, as this deployment delivers (the app's archive included)
        with in_stage("uploading"):
            delivery = deliver(files, job_id, adapter, settings, None, {})
            result.update({k: v for k, v in delivery.items() if k != "warnings"})
    elif settings.s3_configured and links and all(u.startswith(("http://", "https://")) for u in links.values()):
        archive = result.get("adapter_archive") or {}
        result["model_files"] = presigned_urls(list(links), job_id, settings)
        if archive.get("name"):
            archive["url"] = presigned_urls([archive["name"]], job_id, settings)[archive["name"]]
    else:
        raise JobError(f"job {job_id} completed earlier, but its adapter is gone from {adapter}: send retrain: true "
                       "to train it again", stage="starting")
    result["warnings"] = result.get("warnings", []) + [
        f"job {job_id} had already completed: this is its stored result (send retrain: true to train again)"]
    log.info("job %s already completed; returning its stored result", job_id)
    return result


def large_file_warnings(files: list[Path]) -> list[str]:
    return [f"{p.name} is {p.stat().st_size / 1024**2:.0f} MB: the BrightRun app copies each file in a 256 MB Edge "
            "Function and may fail to copy it; a lower lora_rank (or fewer lora_target_modules) makes it smaller"
            for p in files if p.stat().st_size > APP_FILE_WARN_BYTES]


def gpu_warnings(gpu_config, metrics: dict) -> list[str]:
    """gpu_config.count is informational: a count that differs from the ranks that trained is a warning."""
    used = f"{metrics['world_size']} GPU(s)" if metrics["device"] == "cuda" else "the CPU (no GPU visible)"
    if gpu_config is None or (gpu_config.count == metrics["world_size"] and metrics["device"] == "cuda"):
        return []
    return [f"gpu_config asked for {gpu_config.count} GPU(s); this worker trained on {used}"
            + (" (TRAIN_PROCESSES or the endpoint's GPU count decide)" if metrics["device"] == "cuda" else "")]


def sendable(result: dict) -> dict:
    """The output as the SDK can always send it and strict JSON parsers read it: non-finite numbers as null (a
    diverging loss), and within MAX_RESULT_BYTES (the lists of problems are the only parts that grow with the
    input: they are cut first, keeping every count)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value

    result = finite(result)
    for keep in (20, 0):
        if len(json.dumps(result, ensure_ascii=False).encode("utf-8", "replace")) <= MAX_RESULT_BYTES:
            break
        for section, key in (("dataset_report", "problems"), ("metrics", "length_report")):
            part = result.get(section) or {}
            problems = part.get("problems") if key == "problems" else (part.get(key) or {}).get("problems")
            if isinstance(problems, list) and len(problems) > keep:
                del problems[keep:]
        result.setdefault("warnings", []).append("the lists of problems were shortened to keep the result small")
    return result


def finish_row(row: JobRow, result: dict, stage: str | None, stopped: bool) -> dict:
    """The app's job row's last word: `completed` with the archive's path, or `failed` with the same message as the
    RunPod error; the result says whether it landed (`app_row`). A row the app ended is left as it is."""
    if row.stopped_by or not row.exists:  # the app ended the job (nothing to write over), or there is no row
        row.close()
        result["app_row"] = {"table": row.table, "id": row.job_id, "written": False, "status": row.stopped_by}
        return result
    values = _final_values(row, result, stage, stopped)
    problem = row.finish(values, STOPPED_FINAL_DEADLINE_S if stopped else None)
    result["app_row"] = {"table": row.table, "id": row.job_id, "written": problem is None,
                         "status": row.stopped_by or (values["status"] if problem is None else None)}
    if problem:
        result["app_row"]["problem"] = problem
        note = (f"the app's job row ({row.table} id={row.job_id}) could not be set to {values['status']!r}: {problem}"
                + ("; the app will not deploy this adapter until it is" if values["status"] == "completed" else ""))
        if "error" in result:
            result["error"] = redact_text(f"{result['error']} ({note})", MAX_MESSAGE_CHARS)
        else:
            result.setdefault("warnings", []).append(note)
    return result


def _final_values(row: JobRow, result: dict, stage: str | None, stopped: bool) -> dict:
    """The row's columns for the job's end: `failed` with the RunPod error, or `completed` with the archive's path."""
    if "error" in result:
        return {"status": "failed", "error_message": result["error"],
                "error_details": {"stage": stage, "runpod_job_id": row.runpod_job_id, "written_by": WORKER,
                                  "resumable": stopped}}
    metadata = result.get("model_metadata") or {}
    seconds = metadata.get("seconds") or {}
    values = {"status": "completed", "progress": 100, "final_loss": metadata.get("final_loss"),
              "training_time_seconds": round(seconds.get("training", seconds.get("job", 0))),
              "adapter_file_path": (result.get("adapter_archive") or {}).get("storage_path"),
              "error_message": None, "error_details": None}
    if not values["adapter_file_path"]:  # a stored result from a run without Supabase: nothing to point at
        values = {**values, "status": "failed", "error_message": "uploading: the adapter archive is not in the "
                  "app's storage. Resubmit the job with retrain: true"}
    return values
