"""The job's input and the worker's settings: the single source of every default and limit.

`JobInput` is what the BrightRun app POSTs as `input` (both shapes of `hyperparameters` and
`gpu_config` it sends today are accepted); `WorkerSettings` is what the deployment sets in the
environment. Neither imports torch, so a bad job is answered before any heavy import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from serving import check_rank

DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-v0.1"  # what the app sends when the user picked nothing
# With no val_fraction in the job: hold out this share of the conversations for validation_loss (the app's
# quality score, perplexity and overfit check need it), at most VALIDATION_MAX_HELD_OUT of them, once the
# dataset has VALIDATION_MIN_CONVERSATIONS; smaller datasets keep every conversation for training.
VALIDATION_SHARE = 0.1
VALIDATION_MIN_CONVERSATIONS = 10
VALIDATION_MAX_HELD_OUT = 200
# With a validation set the adapter delivered is the epoch with the lowest validation loss, and training stops once it
# has not improved for EARLY_STOPPING_PATIENCE epochs (the default argued in the README, "The epoch delivered").
EARLY_STOPPING_PATIENCE = 2
MAX_STEPS = 1_000_000  # optimizer steps a job may take (about a day at 0.1 s a step): more is a mistake in the settings


class JobError(Exception):
    """An expected failure, written for the person who submitted the job: what happened, what to do.

    `stage` names the step that failed (downloading, loading_data, ...); the handler fills it in.
    """

    def __init__(self, message: str, stage: str | None = None):
        super().__init__(message)
        self.stage = stage

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.stage}: {message}" if self.stage else message


def redact_url(url: str) -> str:
    """Drop the query string and fragment (they carry signed tokens) and any user:password.

    >>> redact_url("https://x.supabase.co/storage/v1/object/sign/b/d.jsonl?token=eyJ")
    'https://x.supabase.co/storage/v1/object/sign/b/d.jsonl?<redacted>'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# A scheme starts where the run of scheme characters starts (the lookbehind): without it the pattern was tried
# again at every position of a long run of letters or digits, quadratic in the run's length.
_URL_IN_TEXT = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+)")
_QUERY_VALUE = re.compile(r"([?&][A-Za-z0-9_.~-]+=)[^\s&'\"<>)]+")
MAX_MESSAGE_CHARS = 2000  # an error message the app shows; longer ones keep their start and end


def redact_text(text: str, limit: int | None = None) -> str:
    """Redact every URL found in free text (exception messages, log lines), and any query-string value
    left over (libraries quote a request's path and query without its host); in time linear in the text.
    With `limit`, the scrubbed text is shortened to about that many characters.

    >>> redact_text("GET /cb?sig=s3cr3t failed")
    'GET /cb?sig=<redacted> failed'
    """
    scrubbed = _QUERY_VALUE.sub(r"\1<redacted>", _URL_IN_TEXT.sub(lambda m: redact_url(m.group(1)), text))
    return shorten(scrubbed, limit) if limit else scrubbed


def shorten(text: str, limit: int) -> str:
    """`text`, or its start and end around a note of how much was left out.

    >>> shorten("a" * 500, 100)
    'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa … [440 characters left out] … aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
    """
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 20, 1)  # room for the note
    return f"{text[:keep]} … [{len(text) - 2 * keep} characters left out] … {text[-keep:]}"


def quoted(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, shortened.

    >>> quoted("9" * 1000)
    "'99999999999999999999999999999999999… (a string of 1000 characters)"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as written"
    return f"{text[:limit - 24]}… (a {type(value).__name__.replace('str', 'string')} of {size})"


class _Section(BaseModel):
    # Unknown keys are kept (and reported as warnings), never rejected: the app adds fields over time.
    # Numbers must be finite: 1e999 or NaN would pass the bounds and reach the output as Infinity/NaN,
    # which strict JSON parsers (the app's) refuse.
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class Hyperparameters(_Section):
    """Training settings. Aliases accept both shapes the app sends (shape A | shape B)."""

    base_model: str | None = Field(None, description="Hub id (`Qwen/Qwen2.5-7B-Instruct`) or local path; default: the worker's DEFAULT_BASE_MODEL")
    learning_rate: float = Field(2e-4, ge=1e-5, le=1e-3, description="Peak learning rate (cosine decay after warmup)")
    batch_size: int = Field(4, ge=1, le=64, description="Sequences per optimizer step (packed sequences when packing)")
    micro_batch_size: int | None = Field(None, ge=1, le=64, description="Sequences per forward pass; default batch_size; the rest is gradient accumulation")
    epochs: int = Field(3, ge=1, le=20, validation_alias=AliasChoices("epochs", "num_epochs"), description="Passes over the dataset (alias num_epochs)")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Stop after this many optimizer steps (default: run all epochs)")
    lora_rank: int = Field(16, ge=4, le=128, validation_alias=AliasChoices("lora_rank", "rank"), description="LoRA rank r (alias rank)")
    lora_alpha: float | None = Field(None, gt=0, le=1024, validation_alias=AliasChoices("lora_alpha", "alpha"), description="LoRA alpha (alias alpha); default 2 x rank")
    lora_dropout: float = Field(0.05, ge=0.0, le=0.5, validation_alias=AliasChoices("lora_dropout", "dropout"), description="LoRA dropout (alias dropout)")
    lora_target_modules: str | list[str] = Field("all-linear", description="`all-linear` (every linear layer of the decoder, not lm_head) or a list of module names; routed MoE experts are never adapted")
    max_seq_length: int = Field(2048, ge=64, le=32768, description="Tokens per packed sequence; longer conversations lose their oldest turns first")
    packing: bool = Field(True, description="Pack several conversations into one sequence, kept apart in every layer (a block-diagonal attention mask; linear-attention and state-space layers run per conversation); architectures where that cannot be done train unpacked, with a warning")
    warmup_steps: int | None = Field(None, ge=0, le=100_000, description="Linear warmup steps; default warmup_ratio x total steps")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Warmup as a fraction of the total steps, when warmup_steps is not given")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, le=100.0, description="Gradient clipping norm")
    early_stopping_patience: int = Field(EARLY_STOPPING_PATIENCE, ge=0, le=20, description="With a validation set: stop once the validation loss has not improved for this many epochs (0: train every epoch); either way the adapter delivered is the epoch with the lowest validation loss")
    val_fraction: float | None = Field(None, ge=0.0, le=0.5, description=f"Share of the conversations held out for validation_loss (whole conversations: a BrightRun conversation's pairs stay together); default {VALIDATION_SHARE:g}, at most {VALIDATION_MAX_HELD_OUT}, when the dataset has at least {VALIDATION_MIN_CONVERSATIONS} conversations, else none; 0: none")
    gradient_checkpointing: Literal["auto"] | bool = Field("auto", description="Recompute activations in backward (less memory; with the base frozen, about 1.5x the compute per token); `auto`: only when the micro-batch would not fit the GPU without it")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Precision of the forward and backward passes; `auto`: bfloat16 on GPUs that have it, float16 on older ones, float32 on the CPU")
    adapter_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Precision of the saved LoRA weights; `auto`: bfloat16 (float16 on GPUs without bf16), half the size of float32, which trains them")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for shuffling, the split and LoRA init")
    checkpoint_steps: int = Field(50, ge=1, le=1_000_000, description="Write a resumable checkpoint every this many steps")
    checkpoint_minutes: float = Field(10.0, gt=0, le=1440, description="... and at least every this many minutes")

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def effective_micro_batch_size(self) -> int:
        return min(self.micro_batch_size or self.batch_size, self.batch_size)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _auto_or_bool(cls, value):
        if value == "auto":
            return value
        try:
            return TypeAdapter(bool).validate_python(value)
        except ValidationError:
            raise ValueError('must be true, false or "auto"') from None

    @field_validator("lora_target_modules")
    @classmethod
    def _plain_module_names(cls, value):
        # PEFT reads any other string as a regular expression (matched against every module name: a pattern
        # can take minutes, or fail inside the library); the worker takes plain names only.
        if value == "all-linear" or (isinstance(value, list) and value and all(
                isinstance(v, str) and _MODULE_NAME.fullmatch(v) for v in value)):
            return value
        raise ValueError("must be 'all-linear' or a list of module names such as ['q_proj', 'v_proj'] (letters, digits "
                         "and '_', joined by '.'); patterns are not accepted")


class GpuConfig(_Section):
    """The GPUs the app asked for; recorded in the metadata (the worker uses what it sees)."""

    count: int = Field(validation_alias=AliasChoices("count", "num_gpus"), ge=1, le=8, description="GPUs requested (alias num_gpus)")
    type: str | None = Field(None, validation_alias=AliasChoices("type", "gpu_type"), description="GPU type requested (alias gpu_type)")
    gpu_memory_gb: float | None = Field(None, ge=0, description="Memory per GPU the app assumed (shape B)")
    cost_per_gpu_hour: float | None = Field(None, ge=0, description="Price the app assumed (shape B)")


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_ID_RULE = "must be 1-128 letters, digits, '.', '_' or '-' (no path separators, no '..')"


def is_safe_job_id(value: str) -> bool:
    """A job id names a directory: no separators, no '..', nothing hidden, no line break (a full match:
    `$` would match before a final newline)."""
    return bool(_JOB_ID.fullmatch(value)) and ".." not in value


class JobInput(_Section):
    """A job's `input`, as the BrightRun app sends it."""

    job_id: str | None = Field(None, description="The app's training job id; names the job directory (default: the RunPod job id)")
    dataset_url: str = Field(description="Signed http(s) URL of the dataset (JSONL, JSON array or gzip)")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings")
    gpu_config: GpuConfig | None = Field(None, description="GPUs requested by the app")
    callback_url: str | None = Field(None, description="Optional URL for one best-effort POST of the final status")
    retrain: bool = Field(False, description="Train again even if this job_id already completed (its stored result is returned otherwise)")
    max_invalid_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Fail when more than this fraction of the dataset's non-blank lines is invalid")

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, value):
        if value is not None and not is_safe_job_id(value):
            raise ValueError(JOB_ID_RULE)
        return value

    @field_validator("dataset_url")
    @classmethod
    def _url_scheme(cls, value):
        scheme = urlsplit(value).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise ValueError("must be an http(s) URL")
        return value


_ALIASES = {"num_epochs": "epochs", "rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
            "num_gpus": "count", "gpu_type": "type"}


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{loc} is missing"
    if kind in ("less_than_equal", "less_than"):
        return f"{loc}={quoted(value)} is above {ctx.get('le', ctx.get('lt'))}"
    if kind in ("greater_than_equal", "greater_than"):
        return f"{loc}={quoted(value)} is below {ctx.get('ge', ctx.get('gt'))}"
    if kind == "finite_number":
        return f"{loc}={quoted(value)}: must be a finite number"
    message = error["msg"].removeprefix("Value error, ")
    return f"{loc}={quoted(value)}: {message}" if not isinstance(value, dict) else f"{loc}: {message}"


def _conflicting_aliases(raw: Mapping[str, Any]) -> list[str]:
    """Both spellings of one field with different values (`epochs` 3 and `num_epochs` 5) is an error."""
    problems = []
    for section in ("hyperparameters", "gpu_config"):
        values = raw.get(section)
        if not isinstance(values, Mapping):
            continue
        for alias, name in _ALIASES.items():
            if alias in values and name in values and values[alias] != values[name]:
                problems.append(f"{section}.{name}={values[name]!r} and {section}.{alias}={values[alias]!r} disagree; send one")
    return problems


def _drop_unknown_keys(model: BaseModel, prefix: str = "") -> list[str]:
    """The keys no field declares, removed (they are warned about, never carried into a fingerprint or an output:
    a 500-deep value there made serialization fail)."""
    unknown = [f"{prefix}{k}" for k in (model.model_extra or {})]
    if model.model_extra:
        model.model_extra.clear()
    for name in type(model).model_fields:
        child = getattr(model, name)
        if isinstance(child, BaseModel):
            unknown += _drop_unknown_keys(child, f"{prefix}{name}.")
    return unknown


def parse_job_input(raw: Any) -> tuple[JobInput, list[str]]:
    """Validate a job's input; return it with warnings, or raise JobError listing every problem.

    >>> parse_job_input({"dataset_url": "https://x/d.jsonl", "hyperparameters": {"learning_rate": 0.5}})
    Traceback (most recent call last):
    ...
    job.JobError: invalid job input: hyperparameters.learning_rate=0.5 is above 0.001
    """
    if not isinstance(raw, Mapping):
        raise JobError(f"invalid job input: expected an object with dataset_url and hyperparameters, got {type(raw).__name__}")
    problems = _conflicting_aliases(raw)
    job = None
    try:
        job = JobInput.model_validate(dict(raw))
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()] + problems
    if problems:
        raise JobError("invalid job input: " + "; ".join(problems))
    warnings = [f"unknown input key ignored: {k}" for k in _drop_unknown_keys(job)]
    return job, warnings


def parse_hyperparameters(values: Mapping[str, Any]) -> Hyperparameters:
    """Hyperparameters given outside a job (the command line), checked like a job's."""
    try:
        return Hyperparameters.model_validate(dict(values))
    except ValidationError as exc:
        raise JobError("invalid hyperparameters: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise JobError(f"environment variable {name}={value!r} is not a boolean; use true or false")


def _setting(default: Any, help: str, kind: type, *aliases: str):
    """A worker setting: its default, help, type, and other environment names it is also read from."""
    return field(default=default, metadata={"help": help, "type": kind, "aliases": aliases})


# Where RunPod puts the models of an endpoint's "Model" setting (its cached models): a Hugging Face cache,
# `models--<org>--<name>/snapshots/<sha>/` (RunPod's documentation, "Cached models").
RUNPOD_CACHED_MODELS = Path("/runpod-volume/huggingface-cache/hub")
LOCAL_VOLUME = Path(__file__).resolve().parent / ".cache" / "runpod-volume"  # a local run's stand-in for /runpod-volume
APP_STORAGE_HELP = ("Supabase Storage's S3 endpoint (S3_ENDPOINT_URL=https://<project>.supabase.co/storage/v1/s3, "
                    "S3_REGION=<the project's region>, S3_BUCKET=lora-models, S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY "
                    "from the project's Storage settings), or AWS S3 or Cloudflare R2")


def job_fingerprint(hp: "Hyperparameters", base_model: str, dataset: str) -> str:
    """What makes two runs the same job, as a hash: the settings, the base model and the dataset (its sha256 for
    training; for a submission before the download, its URL without the signature)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([hp.model_dump(mode="json"), str(base_model), dataset], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of the deployment, read from environment variables named like the fields (upper case)."""

    jobs_dir: Path = _setting(Path("/runpod-volume/lora-jobs"), "each job's files live under `<JOBS_DIR>/<job_id>/`; default `lora-jobs` on the network volume wherever it is mounted (`/runpod-volume`, else `/workspace`; a local run without either: `.cache/runpod-volume/lora-jobs` in the checkout)", Path)
    model_cache_dir: Path = _setting(Path("/runpod-volume/models"), "base models as `<dir>/<org>/<name>` or `<dir>/<name>`; default `models` on the network volume (`/workspace/models` is searched too, the app's team's `MODEL_PATH` and `$HF_HOME/hub` as well)", Path)
    runpod_model_cache: Path = _setting(RUNPOD_CACHED_MODELS, "where RunPod puts the endpoint's cached models (its Model setting; `huggingface-cache/hub` on the volume); searched before MODEL_CACHE_DIR, and before any download", Path)
    keep_quantized_base: bool = _setting(True, "after a base model's first job, keep its 4-bit copy in `<MODEL_CACHE_DIR>/.quantized/` and load that on later jobs (a quarter of the bytes to read, no quantization)", bool)
    default_base_model: str = _setting(DEFAULT_BASE_MODEL, "the base model when a job names none", str)
    allow_model_download: bool = _setting(True, "download a base model that is not cached into MODEL_CACHE_DIR from the Hugging Face Hub (`HF_ENDPOINT`) on first use; later jobs reuse it", bool)
    max_model_download_bytes: int = _setting(200 * 1024**3, "most bytes one base model's download may take, checked on the Hub's listing before any is fetched (200 GiB: Qwen3-Next-80B-A3B in bf16 is about 150 GiB); weight files larger than the model's config.json implies are refused either way", int)
    hf_token: str | None = _setting(None, "Hugging Face token for gated models, used only to download", str)
    base_model_allowlist: str = _setting("", "comma-separated base models a job may use; empty: any", str)
    trust_remote_code_models: str = _setting("", "comma-separated base models allowed to run their own modelling code; empty: none", str)
    max_dataset_bytes: int = _setting(2 * 1024**3, "largest dataset download accepted, in bytes", int)
    max_dataset_examples: int = _setting(500_000, "most conversations a job loads (memory: about 1 KB each and their text); more fails at once", int)
    max_dataset_chars: int = _setting(2 * 1024**3, "most characters of messages a job loads; more fails at once", int)
    download_timeout_s: float = _setting(60.0, "seconds without data before a download attempt is abandoned", float)
    download_deadline_s: float = _setting(1800.0, "seconds a dataset download may take in all, retries included (a server sending a byte at a time is cut off)", float)
    download_retries: int = _setting(4, "retries (exponential backoff) after connection errors, timeouts, short bodies, 429 and 5xx", int)
    allow_file_urls: bool = _setting(False, "accept any `file://` dataset URL (a local run); without it, only the files bundled in the worker's `data/` (the smoke test's `file:data/brightrun-eq12-demo.jsonl`)", bool)
    s3_endpoint_url: str | None = _setting(None, f"S3-compatible storage that signs download links, for the adapter's files: {APP_STORAGE_HELP} (not RunPod's network-volume S3 API: it cannot sign them)", str, "BUCKET_ENDPOINT_URL")
    s3_access_key_id: str | None = _setting(None, "access key for S3_ENDPOINT_URL", str, "BUCKET_ACCESS_KEY_ID")
    s3_secret_access_key: str | None = _setting(None, "secret key for S3_ENDPOINT_URL", str, "BUCKET_SECRET_ACCESS_KEY")
    s3_bucket: str | None = _setting(None, "bucket the adapter's files are uploaded to", str, "BUCKET_NAME")
    s3_prefix: str = _setting("lora-adapters", "key prefix: files go to `<prefix>/<job_id>/<file>`", str)
    s3_region: str = _setting("us-east-1", "region used to sign S3 requests (Supabase: the project's region)", str)
    presigned_url_expiry_s: int = _setting(7 * 24 * 3600, "lifetime of the presigned GET URLs in `model_files` (seconds; SigV4 allows at most 7 days)", int)
    volume_delivery: bool = _setting(False, "deliver on the network volume only: no S3; the result lists each file's path in `volume_files` and has no `model_files` (the app cannot download these)", bool)
    runpod_endpoint_id: str | None = _setting(None, "set by RunPod on an endpoint's workers; there a job fails at once unless Supabase, S3 storage or VOLUME_DELIVERY is set", str)
    train_processes: int | None = _setting(None, "training processes, one per GPU (data parallel, torch.distributed); unset: every visible GPU, 1 on a machine without one", int)
    progress_interval_s: float = _setting(10.0, "least seconds between two progress updates within a stage (stage changes are always sent); also the app's job row", float)
    supabase_url: str | None = _setting(None, "the BrightRun app's Supabase project (`https://<project-ref>.supabase.co`): with SUPABASE_SERVICE_ROLE_KEY, the worker writes the job's row (the pipeline flow) and uploads the adapter archive to its Storage", str)
    supabase_service_role_key: str | None = _setting(None, "the project's service_role key (Settings → API), for the job row and the archive upload", str)
    supabase_jobs_table: str = _setting("pipeline_training_jobs", "the app's table of jobs: the row whose `id` is the job's `job_id` is written live", str)
    supabase_metrics_table: str = _setting("pipeline_training_metrics", "the app's table of per-step metrics (training loss, learning rate, gradient norm; validation loss per epoch)", str)
    supabase_bucket: str = _setting("lora-models", "the Storage bucket the adapter archive is uploaded to", str)
    supabase_adapter_prefix: str = _setting("adapters", "the archive goes to `<SUPABASE_BUCKET>/<prefix>/<job_id>.tar.gz`, the path written into the row's `adapter_file_path`", str)
    supabase_write_deadline_s: float = _setting(60.0, "seconds a progress write to the job row is retried (timeouts, 5xx, 429) before it is dropped; training never waits for it", float)
    supabase_final_deadline_s: float = _setting(600.0, "seconds the final write (completed or failed) is retried before the job's RunPod result says it could not land", float)
    serving_max_lora_rank: int | None = _setting(None, "`max_lora_rank` of the vLLM endpoint that serves the adapters (the BrightRun app's: 16): a job whose lora_rank exceeds it is refused in its first second; the saved adapter is checked against vLLM's LoRA rules either way (serving.py); unset: no rank limit", int)

    @staticmethod
    def _names(value: str) -> list[str]:
        return [n.strip() for n in value.split(",") if n.strip()]

    @property
    def allowed_base_models(self) -> list[str]:
        return self._names(self.base_model_allowlist)

    @property
    def remote_code_models(self) -> list[str]:
        return self._names(self.trust_remote_code_models)

    @property
    def quantized_cache(self) -> Path | None:
        return self.model_cache_dir / ".quantized" if self.keep_quantized_base else None

    @property
    def compile_cache_dir(self) -> Path:
        """Where Triton and Inductor keep compiled kernels (flex attention's), on the volume beside the models and per
        torch version: a worker's second job and a fresh worker skip the compiles."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "none"
        return self.model_cache_dir.parent / "compile-cache" / f"torch-{torch_version}"

    def compile_cache_env(self) -> dict[str, str]:
        """TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR on the volume, unless the deployment set them or the volume
        cannot hold them (the compilers then use their own default under /tmp). Both write their entries atomically
        (a temporary file renamed into place), so a worker killed mid-write leaves no half entry."""
        root = self.compile_cache_dir
        try:
            for sub in ("triton", "inductor"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError:
            return {}
        return {"TRITON_CACHE_DIR": str(root / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}

    @property
    def supabase_configured(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_role_key)

    @property
    def s3_ignored(self) -> bool:
        """RunPod's volume S3 API left in the environment beside Supabase (as the app's team deploys): not used."""
        return self.supabase_configured and is_runpod_volume_s3(self.s3_endpoint_url)

    @property
    def s3_configured(self) -> bool:
        return bool(self.s3_endpoint_url and self.s3_bucket) and not self.s3_ignored

    @property
    def on_endpoint(self) -> bool:
        return bool(self.runpod_endpoint_id)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "WorkerSettings":
        """Build settings from an environment mapping (tests pass a dict; the worker passes os.environ), or
        raise JobError for a deployment that could not deliver a job's result."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            names = (f.name.upper(), *f.metadata["aliases"])
            name, raw = next(((n, env[n]) for n in names if env.get(n)), (names[0], None))
            if raw is None:
                continue
            kind, raw = f.metadata["type"], raw.strip()  # a value pasted with a newline (a key in a header) is refused
            try:
                values[f.name] = _parse_bool(name, raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise JobError(f"environment variable {name}={raw!r} is invalid: {exc}") from None
        endpoint = bool(values.get("runpod_endpoint_id"))
        volume = network_volume()
        if volume is None and not endpoint:
            volume = LOCAL_VOLUME
        if volume is not None:  # the volume wherever it is mounted: job directories never on the container's disk
            values.setdefault("jobs_dir", volume / "lora-jobs")
            values.setdefault("model_cache_dir", volume / "models")
            values.setdefault("runpod_model_cache", volume / "huggingface-cache" / "hub")
        settings = cls(**values)
        if settings.serving_max_lora_rank is not None and (problem := check_rank(1, settings.serving_max_lora_rank)):
            raise JobError(problem)
        _check_delivery(settings, env)
        return settings

    def warnings(self, env: Mapping[str, str]) -> list[str]:
        """What a deployment gets away with, said when the worker starts and in each job's result."""
        notes = []
        if self.s3_ignored:
            notes.append(f"S3_ENDPOINT_URL points at RunPod's network-volume S3 API ({urlsplit(self.s3_endpoint_url).hostname}), "
                         "which cannot sign download links; with SUPABASE_URL set the adapter archive goes to Supabase "
                         "Storage, so the S3_* settings are ignored (unset them to silence this)")
        if self.on_endpoint and network_volume() is None and not env.get("JOBS_DIR"):
            notes.append(f"no network volume is mounted at {' or '.join(map(str, VOLUME_MOUNTS))}: job directories "
                         f"(checkpoints) are in {self.jobs_dir} on the container's disk and are lost when the worker stops, "
                         "and base models are downloaded again; attach a network volume to the endpoint")
        return notes


# Where a RunPod network volume is mounted: /runpod-volume on serverless workers; /workspace on pods, and where the
# app's team mounts it (their notes). The first that exists is the volume.
VOLUME_MOUNTS = (Path("/runpod-volume"), Path("/workspace"))


def network_volume() -> Path | None:
    return next((p for p in VOLUME_MOUNTS if p.is_dir()), None)


def is_runpod_volume_s3(url: str | None) -> bool:
    """RunPod's network-volume S3 API (`https://s3api-<datacenter>.runpod.io`): it cannot presign URLs."""
    return bool(re.fullmatch(r"s3api-[a-z0-9-]+\.runpod\.io", urlsplit(url or "").hostname or ""))


def _check_delivery(settings: WorkerSettings, env: Mapping[str, str]) -> None:
    """Refuse a deployment whose adapter files the app could not download, before any job does work."""
    volume_id = env.get("NETWORK_VOLUME_ID")
    named = (f" NETWORK_VOLUME_ID={volume_id!r} is not read by this worker: it names a RunPod network volume, "
             "whose S3 API cannot sign download links." if volume_id else "")
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    if settings.s3_endpoint_url and (endpoint.scheme not in ("http", "https") or not endpoint.hostname):
        raise JobError(f"S3_ENDPOINT_URL={redact_url(settings.s3_endpoint_url)!r} is not an http(s) URL; give it whole, "
                       "e.g. https://<project-ref>.supabase.co/storage/v1/s3")
    host = endpoint.hostname or ""
    supabase = urlsplit(settings.supabase_url or "")
    if settings.supabase_url and (supabase.scheme not in ("http", "https") or not supabase.hostname):
        raise JobError(f"SUPABASE_URL={redact_url(settings.supabase_url)!r} is not an http(s) URL; give the project's "
                       "URL, e.g. https://<project-ref>.supabase.co")
    if settings.supabase_service_role_key and not settings.supabase_service_role_key.isprintable() \
            or " " in (settings.supabase_service_role_key or ""):
        raise JobError("SUPABASE_SERVICE_ROLE_KEY holds spaces or control characters: paste the project's service_role "
                       "key alone (Supabase dashboard: Settings, API)")
    if bool(settings.supabase_url) != bool(settings.supabase_service_role_key):
        missing = "SUPABASE_SERVICE_ROLE_KEY" if settings.supabase_url else "SUPABASE_URL"
        raise JobError(f"Supabase is half configured: {missing} is not set (set both SUPABASE_URL and "
                       "SUPABASE_SERVICE_ROLE_KEY, the project's service_role key, or neither)")
    if settings.s3_ignored:
        return  # the archive goes to Supabase Storage; the S3 settings are unused (a warning says so)
    if is_runpod_volume_s3(settings.s3_endpoint_url):
        raise JobError(
            f"S3_ENDPOINT_URL points at RunPod's network-volume S3 API ({host}), which does not support presigned "
            f"URLs: the app could not download a single adapter file.{named} Point S3_ENDPOINT_URL, S3_BUCKET and the "
            f"keys at storage that signs download links: {APP_STORAGE_HELP}; or set VOLUME_DELIVERY=true and "
            "unset S3_ENDPOINT_URL to keep the files on the volume")
    partial = [n for n in ("s3_endpoint_url", "s3_bucket", "s3_access_key_id", "s3_secret_access_key")
               if getattr(settings, n)]
    if partial and not settings.s3_configured:
        missing = " and ".join(n.upper() for n in ("s3_endpoint_url", "s3_bucket") if not getattr(settings, n))
        raise JobError(f"S3 upload is half configured: {missing} not set (set both S3_ENDPOINT_URL and "
                       f"S3_BUCKET, or neither){'.' + named if named else ''}")
    if not 1 <= settings.presigned_url_expiry_s <= 7 * 24 * 3600:
        raise JobError(f"PRESIGNED_URL_EXPIRY_S={settings.presigned_url_expiry_s} is outside 1..604800: S3 signatures "
                       "(SigV4) last at most 7 days, so longer links would fail when the app fetches them")
    if settings.s3_configured and settings.volume_delivery:
        raise JobError("both S3 storage (S3_ENDPOINT_URL, S3_BUCKET) and VOLUME_DELIVERY=true are set: choose one")
    if settings.on_endpoint and not (settings.s3_configured or settings.volume_delivery or settings.supabase_configured):
        raise JobError(
            "no storage for the adapter's files: on a RunPod endpoint the app needs them where it can download them. "
            "Set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY (the app's pipeline flow: the job row and the archive in "
            f"Supabase Storage), or S3_ENDPOINT_URL, S3_BUCKET, S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY ({APP_STORAGE_HELP}), or set "
            f"VOLUME_DELIVERY=true to keep the files on the network volume (the app then gets no files){'.' + named if named else ''}")
