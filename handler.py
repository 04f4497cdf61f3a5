"""RunPod serverless worker: a chat dataset in, a LoRA adapter out.

One job flows: validate the input → download the dataset → normalize it → train (4-bit QLoRA) →
deliver the adapter's files. Each step is a plain function in its own module; this file only calls
them in order, reports progress, and turns failures into `{"error": "<stage>: <what to do>"}`.

    python handler.py --test_input '{"input": {...}}'      # one job, locally
    python handler.py --rp_serve_api --rp_api_port 8000     # the SDK's local API server
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

# The runpod SDK logs every job's input and output at DEBUG, its default level: that would put signed
# dataset URLs and presigned download links in the worker's log. INFO unless the deployment says otherwise.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizers thread pool

import runpod  # noqa: E402

from app_row import WORKER, JobRow  # noqa: E402
from archive import build_archive, signed_url, upload_archive  # noqa: E402
from checkpoints import Cancelled, Stopped, clear_stop_request, request_stop, stop_on_sigterm  # noqa: E402
from dataset_loader import DatasetError, load_dataset, write_jsonl  # noqa: E402
from job import (JOB_ID_RULE, MAX_MESSAGE_CHARS, JobError, WorkerSettings, is_safe_job_id, job_fingerprint, parse_job_input,  # noqa: E402
                 redact_text, redact_url)
from files import JobLock, new_file, private_dir, volume_fault, write_atomically  # noqa: E402
from storage import (LinkExpired, check_storage, download_dataset, post_callback, presigned_urls,  # noqa: E402
                     supabase_object, upload_files)
from architecture import check_fits, load_config  # noqa: E402
from model_hub import (HubDownload, ModelNotOnHub, cached_models, find_base_model, hub_offline,  # noqa: E402
                       resolve_base_model, trust_remote_code_for)
from model_loading import free_gpu_memory_gb, select_precision, unsupported_gpu  # noqa: E402
from distributed import shared_memory_note  # noqa: E402
from serving import check_adapter, check_rank  # noqa: E402

log = logging.getLogger("worker")

# Overall progress (0..100) at the start of each stage, in the order they run; a stage that reports a
# percent (the model download, training) fills the span up to the next one.
STAGE_START = {"downloading": 1, "loading_data": 3, "downloading_model": 5, "loading_model": 9, "training": 10,
               "saving": 95, "uploading": 97}
_NEXT_START = dict(zip(STAGE_START, [*list(STAGE_START.values())[1:], 100]))


class RedactingFilter(logging.Filter):
    """No signed URL token reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = ()
        return True


class ProgressReporter:
    """Sends what the app polls (`progress`, `current_epoch`, `current_step`, `total_steps`, `stage`,
    `metrics`) at each stage change, at each epoch's validation loss, and at most every `interval_s`
    seconds in between.

    The app inserts a `metrics_points` row for each update that has `metrics`, with `training_loss`,
    `learning_rate`, the epoch and the step in NOT NULL columns: updates before training carry no
    `metrics`, and from the start of training on an update is sent only once they all hold numbers (the
    first step's end); later updates carry the last loss and learning rate, and the other figures only
    in the update that measured them (a validation loss is not repeated as if measured again). `total_steps` is ours (the app's own
    count ignores packing). The SDK posts progress to RUNPOD_WEBHOOK_POST_OUTPUT from a thread; where
    that is unset (a local run) there is nobody to tell, so nothing is sent.
    """

    METRICS = {"training_loss": "loss", "validation_loss": "validation_loss", "learning_rate": "learning_rate",
               "throughput": "tokens_per_second", "gpu_utilization": "gpu_utilization", "gradient_norm": "grad_norm"}
    TRAINING_STAGES = ("training", "saving", "uploading")
    CARRIED = {"training_loss", "learning_rate"}  # NOT NULL in the app's metrics_points: the last values, always

    def __init__(self, job: dict, enabled: bool, interval_s: float = 10.0):
        self.job, self.enabled, self.interval_s = job, enabled, interval_s
        self.on_event = lambda: None  # e.g. the job lock's heartbeat
        self.row: JobRow | None = None  # the app's job row (pipeline flow): every step's figures, the same updates
        self.stage = None  # the stage the job is in (failures are labelled with it)
        self.sent_stage, self.last_sent = None, 0.0
        self.carried: dict = {}
        self.payload = {"progress": 0.0, "current_epoch": 0, "current_step": 0, "total_steps": None, "stage": None}

    def __call__(self, event: dict) -> None:
        self.on_event()
        stage = self.stage = event.get("stage", self.stage)
        if self.row is not None:
            self.row.metrics(event)
            # in training the trainer stops after its step, checkpointed; elsewhere at the next event on the job's own
            # thread (the model download reports from a watcher thread, which must live on)
            if self.row.stopped_by and stage != "training" and threading.current_thread() is threading.main_thread():
                raise Cancelled(stopped_by_app(self.row))
        start, end = STAGE_START.get(stage, 0), _NEXT_START.get(stage, 0)
        metrics = {name: event[key] for name, key in self.METRICS.items()  # no inf (an fp16 step's skipped gradients)
                   if event.get(key) is not None and math.isfinite(event[key])}
        self.carried.update({k: v for k, v in metrics.items() if k in self.CARRIED})
        self.payload = {
            "progress": round(start + (end - start) * event["percent"] / 100 if "percent" in event else start, 1),
            "current_epoch": event.get("epoch", self.payload["current_epoch"]),
            "current_step": event.get("step", self.payload["current_step"]),
            "total_steps": event.get("total_steps", self.payload["total_steps"]),
            "stage": stage,
            # the app inserts a metrics row for every update that has `metrics`: none before the first step;
            # a figure measured once (a validation loss, a step's throughput) is sent with that update only
            **({"metrics": {**self.carried, **metrics}} if self.carried or metrics else {}),
        }
        if stage in self.TRAINING_STAGES and not self.CARRIED <= self.carried.keys():
            return  # no step has ended yet: the app could not store this update
        now = time.monotonic()
        if stage != self.sent_stage or "validation_loss" in metrics or now - self.last_sent >= self.interval_s:
            self.sent_stage, self.last_sent = stage, now
            log.info("progress %s %.1f%% step %s", stage, self.payload["progress"], self.payload["current_step"])
            if self.row is not None:
                self.row.progress(self.payload)
            if self.enabled:
                runpod.serverless.progress_update(self.job, self.payload)


def stopped_by_app(row: JobRow) -> str:
    what = "the user cancelled it" if row.stopped_by == "cancelled" else f"its status became {row.stopped_by!r}"
    return f"the app ended this job ({what}; {row.table} id={row.job_id})"


def _job_log(job_dir: Path) -> logging.Handler:
    handler = logging.StreamHandler(os.fdopen(new_file(job_dir / "job.log", append=True), "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return handler


@contextmanager
def _stage(name: str, progress: "ProgressReporter | None" = None, announce: bool = True):
    """Enter a stage (announced to the app unless `announce` is false: the checks that run before the
    dataset's download); label the failures raised inside it with its name."""
    if progress and announce:
        progress({"stage": name})
    elif progress:
        progress.stage = name
    try:
        yield
    except JobError as exc:
        exc.stage = exc.stage or name
        raise
    except DatasetError as exc:
        raise JobError(str(exc), stage=name) from None
    except OSError as exc:
        if fault := volume_fault(exc):
            raise JobError(fault, stage=name) from None
        raise


def run_job(job: dict, settings: WorkerSettings, progress: ProgressReporter) -> dict:
    """The job's steps in order. Raises JobError (expected) or anything else (a bug)."""
    with _stage("validating"):
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
    with _stage("starting"):
        _job_directory(job_dir)
        lock = JobLock(job_dir / "job.lock")
        lock.acquire()
    progress.on_event = lock.heartbeat
    file_log = _job_log(job_dir)
    try:
        clear_stop_request(job_dir / "checkpoints")  # a cancel of an earlier run of this job is spent
        if settings.supabase_configured:  # the app's row: read (the deployment's check) and claimed, in the first second
            with _stage("starting", progress, announce=False):
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


def _run_locked(spec, job_id: str, job_dir: Path, settings: WorkerSettings, progress, warnings: list[str]) -> dict:
    """The job under its lock: its stored result, or the checks, the downloads, training, delivery and the result."""
    hp, started, seconds = spec.hyperparameters, time.monotonic(), {}
    base_model = hp.base_model or settings.default_base_model
    trust_remote_code = trust_remote_code_for(base_model, settings.remote_code_models)
    # What makes two submissions the same job: the settings and the dataset's location (a new signed URL for the
    # same file is the same dataset), not the signature, callback or GPU request.
    input_fingerprint = job_fingerprint(hp, base_model, redact_url(spec.dataset_url))
    stored = job_dir / "result.json"
    if (previous := _previous_result(spec, stored, job_id, input_fingerprint, settings, warnings)) is not None:
        return previous
    # Everything that can fail in seconds does, before the dataset or any weight is downloaded.
    if settings.s3_configured:
        with _stage("starting", progress, announce=False):
            check_storage(settings, job_id)
    with _stage("loading_model", progress, announce=False):
        processes = _prepare_machine(settings, warnings)
        base_path, model_download = _find_or_plan_download(base_model, hp, settings, trust_remote_code, progress, processes)
    log.info("job %s: base model %s (%s), dataset %s", job_id, base_model, base_path or "to download",
             redact_url(spec.dataset_url))
    try:
        download, conversations, report = _dataset(spec, job_dir, settings, progress, seconds, warnings)
        if model_download is not None:
            with _stage("downloading_model", progress), _timed(seconds, "model_download"):
                base_path = model_download.complete(
                    lambda done: progress({"stage": "downloading_model", "percent": 100.0 * done}))
            warnings.append(f"base model {base_model} was downloaded into {base_path} (first use); later jobs reuse it")
    finally:
        if model_download is not None:
            model_download.release()

    import train_lora  # torch, transformers and bitsandbytes load here, on the first job

    adapter_dir = job_dir / "adapter"
    with _stage("training"), _timed(seconds, "training"):
        metrics = train_lora.train(conversations, base_path, adapter_dir, hp, on_progress=progress,
                                   trust_remote_code=trust_remote_code, checkpoint_dir=job_dir / "checkpoints",
                                   fingerprint=job_fingerprint(hp, str(base_path), download.sha256),
                                   quantized_cache=settings.quantized_cache, processes=processes).metrics
    warnings += [f"the serving endpoint (vLLM) may not load this adapter: {problem}" for problem in check_adapter(
        adapter_dir, (load_config(base_path).get("architectures") or ["unknown"])[0], settings.serving_max_lora_rank)]
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file())
    delivery = _deliver(files, job_id, adapter_dir, settings, progress, seconds)
    seconds["job"] = time.monotonic() - started
    warnings = warnings + _gpu_warnings(spec.gpu_config, metrics) + _large_file_warnings(files) + delivery.pop("warnings")
    warnings += settings.warnings(os.environ)
    result = {
        **delivery,
        "model_metadata": {
            "base_model": base_model, "base_model_path": str(base_path),
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
        "adapter_path": str(adapter_dir),
        "dataset_report": {**report.to_dict(), "chat_format": metrics["chat_format"]},
        "warnings": warnings + report.warnings + metrics["warnings"],
    }
    write_atomically(stored, json.dumps(sendable({"input_fingerprint": input_fingerprint, "result": result}), indent=2))
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # the adapter is complete: checkpoints are spent
    return result


def _previous_result(spec, stored: Path, job_id: str, input_fingerprint: str, settings: WorkerSettings,
                     warnings: list[str]) -> dict | None:
    """The result a completed job stored (or its refusal, for other settings); None when the job is to run."""
    if spec.retrain:
        stored.unlink(missing_ok=True)
        shutil.rmtree(stored.parent / "checkpoints", ignore_errors=True)
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


def _dataset(spec, job_dir: Path, settings: WorkerSettings, progress, seconds: dict, warnings: list[str]):
    """The dataset downloaded into the job directory and loaded: (download, conversations, report)."""
    fetch = functools.partial(download_dataset, dest=job_dir / "dataset.download", max_bytes=settings.max_dataset_bytes,
                              timeout=settings.download_timeout_s, retries=settings.download_retries,
                              deadline_s=settings.download_deadline_s, allow_file_urls=settings.allow_file_urls)
    with _stage("downloading", progress), _timed(seconds, "download"):
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
    with _stage("loading_data", progress):
        conversations, report = load_dataset(download.path, max_invalid_fraction=spec.max_invalid_fraction,
                                             max_examples=settings.max_dataset_examples, max_chars=settings.max_dataset_chars)
        write_jsonl(conversations, job_dir / "dataset.canonical.jsonl")
    log.info("dataset: %d bytes, sha256 %s; %d examples %s, %d skipped, %d invalid, %d duplicates", download.bytes,
             download.sha256, report.examples, dict(report.formats), report.skipped, report.invalid, report.duplicates)
    return download, conversations, report


def _find_or_plan_download(name: str, hp, settings: WorkerSettings, trust_remote_code: bool, progress, processes: int):
    """(local directory, None) for a model on this worker; (None, HubDownload) for one to download, after
    its config.json passed the fit check and the volume has room for it."""
    cache_dirs = [settings.model_cache_dir, Path("/workspace/models")]
    found = find_base_model(name, cache_dirs, allowed=settings.allowed_base_models, runpod_cache=settings.runpod_model_cache)
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
            raise ModelNotOnHub(f"{exc}. Cached models on this worker: {', '.join(cached_models(cache_dirs)) or 'none'}") from None
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


def _deliver(files: list[Path], job_id: str, adapter_dir: Path, settings: WorkerSettings, progress, seconds) -> dict:
    """The adapter delivered as the deployment delivers it: as one archive (`<job_id>.tar.gz`, `adapter/` inside) in the
    app's Supabase Storage (the pipeline flow), and its files and the archive as presigned URLs (S3), the volume's
    paths (VOLUME_DELIVERY) or file:// URLs (a local run). Returns `adapter_archive`, `model_files` or `volume_files`
    (none with Supabase alone), and `warnings`."""
    if progress is not None and progress.row is not None and progress.row.stopped_by:
        raise Cancelled(f"{stopped_by_app(progress.row)} after training; nothing was uploaded")
    with _stage("uploading", progress, announce=settings.s3_configured or settings.supabase_configured), \
            _timed(seconds, "upload"):
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


# The app's function that copies the adapter buffers each file whole in a Supabase Edge Function (256 MB
# of memory, its own runtime included): files above this are likely to fail there.
APP_FILE_WARN_BYTES = 200 * 1024**2


def _large_file_warnings(files: list[Path]) -> list[str]:
    return [f"{p.name} is {p.stat().st_size / 1024**2:.0f} MB: the BrightRun app copies each file in a 256 MB Edge "
            "Function and may fail to copy it; a lower lora_rank (or fewer lora_target_modules) makes it smaller"
            for p in files if p.stat().st_size > APP_FILE_WARN_BYTES]


def _job_directory(job_dir: Path) -> None:
    """The job's directory, a real one of the worker's own, with no link in it: a link planted there (by anyone
    who can write to the volume) would make the job write, as root, wherever it points."""
    if job_dir.is_symlink():
        raise JobError(f"the job directory {job_dir} is a symbolic link; remove it (or use another job_id) and resubmit")
    try:
        private_dir(job_dir)
    except OSError as exc:
        raise JobError(f"cannot create the job directory {job_dir} ({exc.strerror or exc}): check that JOBS_DIR is on a "
                       "writable volume with free space") from None
    for entry in job_dir.iterdir():
        if entry.is_symlink():
            log.warning("removed a symbolic link planted in the job directory: %s -> %s", entry, os.readlink(entry))
            entry.unlink()


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
        with _stage("uploading"):
            result.update({k: v for k, v in _deliver(files, job_id, adapter, settings, None, {}).items() if k != "warnings"})
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


@contextmanager
def _timed(seconds: dict, name: str):
    t0 = time.monotonic()
    try:
        yield
    finally:
        seconds[name] = time.monotonic() - t0


def training_processes(settings: WorkerSettings) -> int:
    """How many ranks train: TRAIN_PROCESSES, else one per visible GPU (1 without one); more than the GPUs is refused."""
    from distributed import visible_gpus

    gpus, wanted = visible_gpus(), settings.train_processes
    if wanted is not None and (wanted < 1 or wanted > max(gpus, 8 if not gpus else gpus)):
        raise JobError(f"TRAIN_PROCESSES={wanted} but this worker has {gpus or 'no'} GPU(s): set it between 1 and "
                       f"{gpus or 8} (one process per GPU; on a machine without one, gloo on the CPU, for tests), or unset it")
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


def _gpu_warnings(gpu_config, metrics: dict) -> list[str]:
    """gpu_config.count is informational: a count that differs from the ranks that trained is a warning."""
    used = f"{metrics['world_size']} GPU(s)" if metrics["device"] == "cuda" else "the CPU (no GPU visible)"
    if gpu_config is None or (gpu_config.count == metrics["world_size"] and metrics["device"] == "cuda"):
        return []
    return [f"gpu_config asked for {gpu_config.count} GPU(s); this worker trained on {used}"
            + (" (TRAIN_PROCESSES or the endpoint's GPU count decide)" if metrics["device"] == "cuda" else "")]


MAX_RESULT_BYTES = 1_000_000  # a job's output as JSON; the SDK refuses about 20 MB, and the app reads it whole


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


def handler(job: dict) -> dict:
    """RunPod entry point: the job's result, or {"error": "<stage>: <message>"}."""
    try:
        settings = WorkerSettings.from_env(os.environ)
    except JobError as exc:
        return {"error": f"worker settings: {str(exc).rstrip('.')}. Fix the endpoint's environment variables"}
    progress = ProgressReporter(job, enabled=bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT")),
                                interval_s=settings.progress_interval_s)
    # SIGTERM ends the job at any stage (training: after a checkpoint); the block ends after the app's row is written,
    # as the signal's default action (where the SDK left it) ends the process there
    with stop_on_sigterm(checkpointing=True):  # outside run_job a signal only raises the flag: the row's word is written
        stopped, stage = False, None  # by SIGTERM: the job can be resumed; the stage that failed
        try:
            with stop_on_sigterm(checkpointing=False):
                result = run_job(job, settings, progress)
        except JobError as exc:
            stopped, stage = isinstance(exc, Stopped) and not isinstance(exc, Cancelled), exc.stage
            result = {"error": redact_text(str(exc), MAX_MESSAGE_CHARS)}
            if progress.row is not None and progress.row.stopped_by and not isinstance(exc, Cancelled):
                result["error"] = redact_text(f"{progress.stage}: {stopped_by_app(progress.row)}; training stopped with "
                                              f"a checkpoint and nothing was uploaded ({exc})", MAX_MESSAGE_CHARS)
        except Exception as exc:  # a bug (or a fault of the volume): the job's log has the traceback
            if fault := volume_fault(exc):
                result = {"error": redact_text(f"{progress.stage or 'starting'}: {fault}", MAX_MESSAGE_CHARS)}
            else:
                log.error("internal error in job %s:\n%s", job.get("id"), redact_text(traceback.format_exc()))
                result = {"error": f"{progress.stage or 'validating'}: internal error ({type(exc).__name__}: "
                                   f"{redact_text(str(exc), 500)}) in job {job.get('id')}. Retry once; if it fails again, "
                                   "report the job id"}
        if progress.row is not None:
            try:
                result = _finish_row(progress.row, result, stage or progress.stage, stopped)
            except Exception:  # noqa: BLE001 - the job's result goes out whatever happened to the row's last word
                log.error("the app's job row could not be finished:\n%s", redact_text(traceback.format_exc()))
    result = sendable(result)
    callback = (job.get("input") or {}).get("callback_url") if isinstance(job.get("input"), dict) else None
    if isinstance(callback, str) and callback:
        status = "FAILED" if "error" in result else "COMPLETED"
        post_callback(callback, {"id": job.get("id"), "status": status, **({"error": result["error"]} if "error" in result else {"output": result})})
    return result


STOPPED_FINAL_DEADLINE_S = 20.0  # after SIGTERM the container is killed soon: the failed row gets this long


def _finish_row(row: JobRow, result: dict, stage: str | None, stopped: bool) -> dict:
    """The app's job row's last word: `completed` with the archive's path, or `failed` with the same message as the
    RunPod error; the result says whether it landed (`app_row`). A row the app ended is left as it is."""
    if row.stopped_by or not row.exists:  # the app ended the job (nothing to write over), or there is no row
        row.close()
        result["app_row"] = {"table": row.table, "id": row.job_id, "written": False, "status": row.stopped_by}
        return result
    if "error" in result:
        values = {"status": "failed", "error_message": result["error"],
                  "error_details": {"stage": stage, "runpod_job_id": row.runpod_job_id, "written_by": WORKER,
                                    "resumable": stopped}}
    else:
        metadata = result.get("model_metadata") or {}
        seconds = metadata.get("seconds") or {}
        values = {"status": "completed", "progress": 100, "final_loss": metadata.get("final_loss"),
                  "training_time_seconds": round(seconds.get("training", seconds.get("job", 0))),
                  "adapter_file_path": (result.get("adapter_archive") or {}).get("storage_path"),
                  "error_message": None, "error_details": None}
        if not values["adapter_file_path"]:  # a stored result from a run without Supabase: nothing to point at
            values = {**values, "status": "failed", "error_message": "uploading: the adapter archive is not in the "
                      "app's storage. Resubmit the job with retrain: true"}
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
