"""RunPod serverless worker: a chat dataset in, a LoRA adapter out.

One job flows: validate the input → download the dataset → normalize it → train (4-bit QLoRA) →
deliver the adapter's files. Each step is a plain function in its own module; this file only calls
them in order and turns failures into `{"error": "<stage>: <what to do>"}` (the progress the app polls:
`progress.py`; the result, its delivery and the app row's last word: `results.py`).

    python handler.py --test_input '{"input": {...}}'      # one job, locally
    python handler.py --rp_serve_api --rp_api_port 8000     # the SDK's local API server
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback
from pathlib import Path

# The runpod SDK logs every job's input and output at DEBUG, its default level: that would put signed
# dataset URLs and presigned download links in the worker's log. INFO unless the deployment says otherwise.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers thread pool

import runpod  # noqa: E402

from app_row import JobRow  # noqa: E402
from architecture import check_fits, load_config  # noqa: E402
from checkpoints import Cancelled, Stopped, clear_stop_request, request_stop, stop_on_sigterm  # noqa: E402
from dataset_loader import load_dataset, write_jsonl  # noqa: E402
from device import free_gpu_memory_gb, select_precision, unsupported_gpu  # noqa: E402
from distributed import shared_memory_note, visible_gpus  # noqa: E402
from files import JobLock, new_file, private_dir, volume_fault  # noqa: E402
from job import (JOB_ID_RULE, MAX_MESSAGE_CHARS, JobError, is_safe_job_id, job_fingerprint,  # noqa: E402
                 parse_job_input, redact_text, redact_url)
from model_hub import (HubDownload, ModelNotOnHub, cached_models, find_base_model, hub_offline,  # noqa: E402
                       resolve_base_model, trust_remote_code_for)
from progress import ProgressReporter, in_stage, stopped_by_app, timed  # noqa: E402
from results import Prepared, deliver, finish_row, job_result, previous_result, sendable, store_result  # noqa: E402
from serving import check_adapter, check_rank  # noqa: E402
from settings import WorkerSettings  # noqa: E402
from storage import LinkExpired, check_storage, download_dataset, post_callback, supabase_object  # noqa: E402

log = logging.getLogger("worker")


class RedactingFilter(logging.Filter):
    """No signed URL token reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = ()
        return True


def _job_log(job_dir: Path) -> logging.Handler:
    handler = logging.StreamHandler(os.fdopen(new_file(job_dir / "job.log", append=True), "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return handler


def handler(job: dict) -> dict:
    """RunPod entry point: the job's result, or {"error": "<stage>: <message>"}."""
    try:
        settings = WorkerSettings.from_env(os.environ)
    except JobError as exc:
        return {"error": f"worker settings: {str(exc).rstrip('.')}. Fix the endpoint's environment variables"}
    progress = ProgressReporter(job, enabled=bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT")),
                                interval_s=settings.progress_interval_s)
    # SIGTERM ends the job at any stage (training: after a checkpoint); the block ends after the app's row is written,
    # as the signal's default action (where the SDK left it) ends the process there. Outside run_job a signal only
    # raises the flag: the row's word is written.
    with stop_on_sigterm(checkpointing=True):
        try:
            result, stage, stopped = _result_or_error(job, settings, progress)
            if progress.row is not None:
                try:
                    result = finish_row(progress.row, result, stage or progress.stage, stopped)
                except Exception:  # noqa: BLE001 - the job's result goes out whatever happened to the row's last word
                    log.error("the app's job row could not be finished:\n%s", redact_text(traceback.format_exc()))
        finally:
            progress.close()  # the updates still queued reach the app (a few seconds at most) before the result
    result = sendable(result)
    callback = (job.get("input") or {}).get("callback_url") if isinstance(job.get("input"), dict) else None
    if isinstance(callback, str) and callback:
        status = "FAILED" if "error" in result else "COMPLETED"
        post_callback(callback, {"id": job.get("id"), "status": status,
                                 **({"error": result["error"]} if "error" in result else {"output": result})})
    return result


def _result_or_error(job: dict, settings: WorkerSettings, progress: ProgressReporter) -> tuple[dict, str | None, bool]:
    """The job run: its result or its error, the stage that failed, and whether SIGTERM stopped it (resumable)."""
    try:
        with stop_on_sigterm(checkpointing=False):
            return run_job(job, settings, progress), None, False
    except JobError as exc:
        result = {"error": redact_text(str(exc), MAX_MESSAGE_CHARS)}
        if progress.row is not None and progress.row.stopped_by and not isinstance(exc, Cancelled):
            result["error"] = redact_text(f"{progress.stage}: {stopped_by_app(progress.row)}; training stopped with "
                                          f"a checkpoint and nothing was uploaded ({exc})", MAX_MESSAGE_CHARS)
        return result, exc.stage, isinstance(exc, Stopped) and not isinstance(exc, Cancelled)
    except Exception as exc:  # noqa: BLE001 - a bug (or a fault of the volume): the job's log has the traceback
        if fault := volume_fault(exc):
            return {"error": redact_text(f"{progress.stage or 'starting'}: {fault}", MAX_MESSAGE_CHARS)}, None, False
        log.error("internal error in job %s:\n%s", job.get("id"), redact_text(traceback.format_exc()))
        return {"error": f"{progress.stage or 'validating'}: internal error ({type(exc).__name__}: "
                         f"{redact_text(str(exc), 500)}) in job {job.get('id')}. Retry once; if it fails again, "
                         "report the job id"}, None, False


def run_job(job: dict, settings: WorkerSettings, progress: ProgressReporter) -> dict:
    """The job's steps in order. Raises JobError (expected) or anything else (a bug)."""
    with in_stage("validating"):
        try:
            spec, warnings = parse_job_input(job.get("input"))
            if problem := check_rank(spec.hyperparameters.lora_rank, settings.serving_max_lora_rank):
                raise JobError(f"the adapter could not be served: {problem}")
        except JobError:
            _open_row_to_report(job, settings, progress)
            raise
        job_id = spec.job_id or str(job.get("id") or "")
        if not is_safe_job_id(job_id):
            raise JobError(f"invalid job input: job id {job_id!r} {JOB_ID_RULE}")
    job_dir = settings.jobs_dir / job_id
    with in_stage("starting"):
        _job_directory(job_dir)
        lock = JobLock(job_dir / "job.lock")
        lock.acquire()
    progress.on_event = lock.heartbeat
    file_log = _job_log(job_dir)
    try:
        clear_stop_request(job_dir / "checkpoints")  # a cancel of an earlier run of this job is spent
        if settings.supabase_configured:  # the app's row: read (the deployment's check) and claimed, in the 1st second
            with in_stage("starting", progress, announce=False):
                progress.row = JobRow.open(settings, job_id, job.get("id"), on_stop=lambda status: request_stop(
                    job_dir / "checkpoints", stopped_by_app(progress.row)))
            warnings += progress.row.warnings
        return _run_locked(spec, job_id, job_dir, settings, progress, warnings)
    except Exception:
        log.error("job %s failed in %s:\n%s", job_id, progress.stage, redact_text(traceback.format_exc()))
        raise
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()
        file_log.stream.close()  # a StreamHandler leaves its stream open
        lock.release()


def _open_row_to_report(job: dict, settings: WorkerSettings, progress: ProgressReporter) -> None:
    """An input the worker refuses still ends the app's row (`failed`, with the reason), when its job_id names one."""
    raw = job.get("input") if isinstance(job.get("input"), dict) else {}
    job_id = raw.get("job_id")
    if settings.supabase_configured and isinstance(job_id, str) and is_safe_job_id(job_id):
        try:
            progress.row = JobRow.open(settings, job_id, job.get("id"))
        except Exception as exc:  # noqa: BLE001 - the refusal itself is the job's error, whatever happens here
            log.warning("the app's job row could not be told of the refused input: %s", redact_text(str(exc)))


def _run_locked(spec, job_id: str, job_dir: Path, settings: WorkerSettings, progress: ProgressReporter,
                warnings: list[str]) -> dict:
    """The job under its lock: its stored result, or the checks and downloads, training, delivery and the result."""
    started, seconds = time.monotonic(), {}
    base_model = spec.hyperparameters.base_model or settings.default_base_model
    # What makes two submissions the same job: the settings and the dataset's location (a new signed URL for the
    # same file is the same dataset), not the signature, callback or GPU request.
    input_fingerprint = job_fingerprint(spec.hyperparameters, base_model, redact_url(spec.dataset_url))
    if (previous := previous_result(spec, job_dir, job_id, input_fingerprint, settings, warnings)) is not None:
        return previous
    prepared = _prepare(spec, base_model, job_id, job_dir, settings, progress, seconds, warnings)
    metrics = _train(spec.hyperparameters, prepared, job_dir, settings, progress, seconds)
    model_class = (load_config(prepared.base_path).get("architectures") or ["unknown"])[0]
    warnings += [f"the serving endpoint (vLLM) may not load this adapter: {problem}" for problem in check_adapter(
        prepared.adapter_dir, model_class, settings.serving_max_lora_rank)]
    files = sorted(p for p in prepared.adapter_dir.iterdir() if p.is_file())
    delivery = deliver(files, job_id, prepared.adapter_dir, settings, progress, seconds)
    seconds["job"] = time.monotonic() - started
    result = job_result(spec, prepared, metrics, files, delivery, seconds, warnings, settings)
    store_result(job_dir, input_fingerprint, result)
    return result


def _prepare(spec, base_model: str, job_id: str, job_dir: Path, settings: WorkerSettings, progress: ProgressReporter,
             seconds: dict, warnings: list[str]) -> Prepared:
    """Everything that can fail in seconds does, before the dataset or any weight is downloaded; then the dataset
    and the base model (when it is not on this worker) are downloaded."""
    trust_remote_code = trust_remote_code_for(base_model, settings.remote_code_models)
    if settings.s3_configured:
        with in_stage("starting", progress, announce=False):
            check_storage(settings, job_id)
    with in_stage("loading_model", progress, announce=False):
        processes = _prepare_machine(settings, warnings)
        base_path, model_download = _find_or_plan_download(base_model, spec.hyperparameters, settings,
                                                           trust_remote_code, progress, processes)
    log.info("job %s: base model %s (%s), dataset %s", job_id, base_model, base_path or "to download",
             redact_url(spec.dataset_url))
    try:
        download, conversations, report = _dataset(spec, job_dir, settings, progress, seconds, warnings)
        if model_download is not None:
            with in_stage("downloading_model", progress), timed(seconds, "model_download"):
                base_path = model_download.complete(
                    lambda done: progress({"stage": "downloading_model", "percent": 100.0 * done}))
            warnings.append(f"base model {base_model} was downloaded into {base_path} (first use); later jobs reuse it")
    finally:
        if model_download is not None:
            model_download.release()
    return Prepared(base_model, base_path, trust_remote_code, processes, download, conversations, report,
                    adapter_dir=job_dir / "adapter")


def _train(hp, prepared: Prepared, job_dir: Path, settings: WorkerSettings, progress: ProgressReporter,
           seconds: dict) -> dict:
    """The adapter trained into `prepared.adapter_dir`, resumable from the job's checkpoints: training's metrics."""
    import train_lora  # torch, transformers and bitsandbytes load here, on the first job

    with in_stage("training"), timed(seconds, "training"):
        return train_lora.train(prepared.conversations, prepared.base_path, prepared.adapter_dir, hp,
                                on_progress=progress, trust_remote_code=prepared.trust_remote_code,
                                checkpoint_dir=job_dir / "checkpoints",
                                fingerprint=job_fingerprint(hp, str(prepared.base_path), prepared.download.sha256),
                                quantized_cache=settings.quantized_cache, processes=prepared.processes).metrics


def _dataset(spec, job_dir: Path, settings: WorkerSettings, progress, seconds: dict, warnings: list[str]):
    """The dataset downloaded into the job directory and loaded: (download, conversations, report)."""
    fetch = functools.partial(download_dataset, dest=job_dir / "dataset.download", max_bytes=settings.max_dataset_bytes,
                              timeout=settings.download_timeout_s, retries=settings.download_retries,
                              deadline_s=settings.download_deadline_s, allow_file_urls=settings.allow_file_urls)
    with in_stage("downloading", progress), timed(seconds, "download"):
        try:
            download = fetch(spec.dataset_url)
        except LinkExpired:
            # The app signs the dataset for 1 hour; a job that waited longer in RunPod's queue reads the same object
            # with the service key, on the deployment's own Supabase project only.
            own = supabase_object(spec.dataset_url, settings.supabase_url) if settings.supabase_configured else None
            if own is None:
                raise
            key = settings.supabase_service_role_key
            download = fetch(own, credentials={"Authorization": f"Bearer {key}", "apikey": key})
            warnings.append("the dataset's signed link had expired (the app signs it for 1 hour); the worker read the "
                            "same file from the app's Supabase Storage with the service key")
            log.warning(warnings[-1])
    with in_stage("loading_data", progress):
        conversations, report = load_dataset(download.path, max_invalid_fraction=spec.max_invalid_fraction,
                                             max_examples=settings.max_dataset_examples,
                                             max_chars=settings.max_dataset_chars)
        write_jsonl(conversations, job_dir / "dataset.canonical.jsonl")
    log.info("dataset: %d bytes, sha256 %s; %d examples %s, %d skipped, %d invalid, %d duplicates", download.bytes,
             download.sha256, report.examples, dict(report.formats), report.skipped, report.invalid, report.duplicates)
    return download, conversations, report


def _find_or_plan_download(name: str, hp, settings: WorkerSettings, trust_remote_code: bool, progress, processes: int):
    """(local directory, None) for a model on this worker; (None, HubDownload) for one to download, after
    its config.json passed the fit check and the volume has room for it."""
    cache_dirs = [settings.model_cache_dir, Path("/workspace/models")]
    found = find_base_model(name, cache_dirs, allowed=settings.allowed_base_models,
                            runpod_cache=settings.runpod_model_cache)
    if found is not None:
        return found, None
    downloads = settings.allow_model_download and not hub_offline()
    if not downloads or "/" not in name or Path(name).is_absolute() or Path(name).exists():
        resolve_base_model(name, cache_dirs, runpod_cache=settings.runpod_model_cache,  # raises, naming where it looked
                           downloads=downloads)
    plan = HubDownload(name, settings.model_cache_dir, token=settings.hf_token, with_code=trust_remote_code,
                       max_bytes=settings.max_model_download_bytes)
    try:
        try:
            config_dir = plan.prepare(on_wait=progress.on_event)
        except ModelNotOnHub as exc:
            cached = ", ".join(cached_models(cache_dirs)) or "none"
            raise ModelNotOnHub(f"{exc}. Cached models on this worker: {cached}") from None
        if config_dir is None:  # another worker completed it while this one waited
            return plan.target, None
        device, compute_dtype = select_precision(hp.compute_dtype)
        check_fits(config_dir, hp, name, compute_dtype=compute_dtype, free_gb=free_gpu_memory_gb(device),
                   trust_remote_code=trust_remote_code, world_size=processes)
        plan.check_free_space()
    except BaseException:
        plan.release()
        raise
    log.info("base model %s is not cached: %.1f GB to download from the Hub at commit %s", name,
             plan.missing_bytes() / 1024**3, plan.sha[:12])
    return None, plan


def _job_directory(job_dir: Path) -> None:
    """The job's directory, a real one of the worker's own, with no link in it: a link planted there (by anyone
    who can write to the volume) would make the job write, as root, wherever it points."""
    if job_dir.is_symlink():
        raise JobError(f"the job directory {job_dir} is a symbolic link; remove it (or use another job_id) and "
                       "resubmit")
    try:
        private_dir(job_dir)
    except OSError as exc:
        raise JobError(f"cannot create the job directory {job_dir} ({exc.strerror or exc}): check that JOBS_DIR is on "
                       "a writable volume with free space") from None
    for entry in job_dir.iterdir():
        if entry.is_symlink():
            log.warning("removed a symbolic link planted in the job directory: %s -> %s", entry, os.readlink(entry))
            entry.unlink()


def training_processes(settings: WorkerSettings) -> int:
    """How many ranks train: TRAIN_PROCESSES, else one per visible GPU (1 without one); more than the GPUs is
    refused."""
    gpus, wanted = visible_gpus(), settings.train_processes
    if wanted is not None and (wanted < 1 or wanted > max(gpus, 8 if not gpus else gpus)):
        raise JobError(f"TRAIN_PROCESSES={wanted} but this worker has {gpus or 'no'} GPU(s): set it between 1 and "
                       f"{gpus or 8} (one process per GPU; on a machine without one, gloo on the CPU, for tests), "
                       "or unset it")
    return wanted or max(1, gpus)


def _prepare_machine(settings: WorkerSettings, warnings: list[str]) -> int:
    """How many processes train; before any download: a GPU the installed torch has no kernels for refused (it would
    fail at its first kernel with "no kernel image is available"), NCCL kept off a small /dev/shm (a warning says so),
    compiled kernels cached on the volume."""
    processes = training_processes(settings)
    if why := unsupported_gpu():
        raise JobError(why)
    if note := shared_memory_note(processes):
        warnings.append(note)
    for name, value in settings.compile_cache_env().items():
        os.environ.setdefault(name, value)
    return processes


def check_deployment() -> None:
    """At the worker's start: a deployment that could not deliver any job's result is logged at once
    (every job then fails in its first second with the same message)."""
    try:
        settings = WorkerSettings.from_env(os.environ)
    except JobError as exc:
        log.error("worker settings: %s. Every job will fail until the endpoint's environment is fixed", exc)
        return
    try:
        notes: list[str] = []
        processes = _prepare_machine(settings, notes)
        for note in notes:
            log.warning("worker settings: %s", note)
    except JobError as exc:
        log.error("worker settings: %s. Every job will fail until the endpoint's environment is fixed", exc)
        return
    for warning in settings.warnings(os.environ):
        log.warning("worker settings: %s", warning)
    if settings.supabase_configured:
        try:  # one authenticated read: a wrong key or URL is said now, and again in each job's first second
            JobRow.check_access(settings)
        except JobError as exc:
            log.error("worker settings: %s. Every job will fail until the endpoint's environment is fixed",
                      str(exc).removeprefix("starting: "))
    delivery = ", ".join(filter(None, [
        f"the app's Supabase ({redact_url(settings.supabase_url)}: job row {settings.supabase_jobs_table}, archive in "
        f"{settings.supabase_bucket}/{settings.supabase_adapter_prefix})" if settings.supabase_configured else "",
        "S3 storage at " + redact_url(settings.s3_endpoint_url) if settings.s3_configured else "",
        "the network volume (VOLUME_DELIVERY)" if settings.volume_delivery else ""])) or "file:// links (a local run)"
    log.info("worker ready: jobs in %s, models in %s, adapters delivered through %s, training in %d process(es)",
             settings.jobs_dir, settings.model_cache_dir, delivery, processes)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for h in logging.getLogger().handlers:
        h.addFilter(RedactingFilter())
    check_deployment()
    runpod.serverless.start({"handler": handler})
