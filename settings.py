"""The worker's settings: what the deployment sets in the environment, and where the network volume is.

`WorkerSettings.from_env(env)` is the one way to build them: it takes the environment as an argument (tests pass
a dict; the worker passes os.environ). Each setting is a field read from the environment variable named like it
(upper case), or from the other names its `validation_alias` lists; its default and help text are the README's
settings table and the RunPod Hub listing (scripts/gen_docs.py). A deployment whose adapter files the app could not
download is refused before any job does work. No torch.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Mapping
from urllib.parse import urlsplit

from pydantic import AliasChoices, AliasGenerator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from job import JobError, redact_url
from serving import check_rank

DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-v0.1"  # what the app sends when the user picked nothing
# Where RunPod puts the models of an endpoint's "Model" setting (its cached models): a Hugging Face cache,
# `models--<org>--<name>/snapshots/<sha>/` (RunPod's documentation, "Cached models").
RUNPOD_CACHED_MODELS = Path("/runpod-volume/huggingface-cache/hub")
LOCAL_VOLUME = Path(__file__).resolve().parent / ".cache" / "runpod-volume"  # a local run's stand-in for /runpod-volume
# Where a RunPod network volume is mounted: /runpod-volume on serverless workers; /workspace on pods, and where the
# app's team mounts it (their notes). The first that exists is the volume.
VOLUME_MOUNTS = (Path("/runpod-volume"), Path("/workspace"))
APP_STORAGE_HELP = ("Supabase Storage's S3 endpoint (S3_ENDPOINT_URL=https://<project>.supabase.co/storage/v1/s3, "
                    "S3_REGION=<the project's region>, S3_BUCKET=lora-models, S3_ACCESS_KEY_ID and "
                    "S3_SECRET_ACCESS_KEY from the project's Storage settings), or AWS S3 or Cloudflare R2")
SIGV4_MAX_EXPIRY_S = 7 * 24 * 3600  # S3 signatures (SigV4) last at most 7 days


def _parse_bool(value: Any) -> bool:
    """A boolean setting, parsed strictly: a typo is refused rather than read as false."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise PydanticCustomError("env_bool", "is not a boolean; use true or false")


EnvBool = Annotated[bool, BeforeValidator(_parse_bool)]


def _number(kind: type):
    """A number setting parsed as Python parses it (`int("4")`, `float("1e3")`; `int("4.0")` is refused), its
    reason Python's own."""
    def parse(value: Any) -> Any:
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        try:
            return kind(value)
        except ValueError as exc:
            raise PydanticCustomError("env_number", "{reason}", {"reason": str(exc)}) from None
    return BeforeValidator(parse)


EnvInt = Annotated[int, _number(int)]
EnvFloat = Annotated[float, _number(float)]


class WorkerSettings(BaseModel):
    """Settings of the deployment, read from environment variables named like the fields (upper case)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True,
        alias_generator=AliasGenerator(validation_alias=lambda name: AliasChoices(name.upper())))

    jobs_dir: Path = Field(Path("/runpod-volume/lora-jobs"), description=(
        "each job's files live under `<JOBS_DIR>/<job_id>/`; default `lora-jobs` on the network volume wherever it "
        "is mounted (`/runpod-volume`, else `/workspace`; a local run without either: "
        "`.cache/runpod-volume/lora-jobs` in the checkout)"))
    model_cache_dir: Path = Field(Path("/runpod-volume/models"), description=(
        "base models as `<dir>/<org>/<name>` or `<dir>/<name>`; default `models` on the network volume "
        "(`/workspace/models` is searched too, the app's team's `MODEL_PATH` and `$HF_HOME/hub` as well)"))
    runpod_model_cache: Path = Field(RUNPOD_CACHED_MODELS, description=(
        "where RunPod puts the endpoint's cached models (its Model setting; `huggingface-cache/hub` on the volume); "
        "searched before MODEL_CACHE_DIR, and before any download"))
    keep_quantized_base: EnvBool = Field(True, description=(
        "after a base model's first job, keep its 4-bit copy in `<MODEL_CACHE_DIR>/.quantized/` and load that on "
        "later jobs (a quarter of the bytes to read, no quantization)"))
    default_base_model: str = Field(DEFAULT_BASE_MODEL, description="the base model when a job names none")
    allow_model_download: EnvBool = Field(True, description=(
        "download a base model that is not cached into MODEL_CACHE_DIR from the Hugging Face Hub (`HF_ENDPOINT`) on "
        "first use; later jobs reuse it"))
    max_model_download_bytes: EnvInt = Field(200 * 1024**3, description=(
        "most bytes one base model's download may take, checked on the Hub's listing before any is fetched (200 "
        "GiB: Qwen3-Next-80B-A3B in bf16 is about 150 GiB); weight files larger than the model's config.json "
        "implies are refused either way"))
    hf_token: str | None = Field(None, description="Hugging Face token for gated models, used only to download")
    base_model_allowlist: str = Field("", description="comma-separated base models a job may use; empty: any")
    trust_remote_code_models: str = Field("", description=(
        "comma-separated base models allowed to run their own modelling code; empty: none"))
    max_dataset_bytes: EnvInt = Field(2 * 1024**3, description="largest dataset download accepted, in bytes")
    max_dataset_examples: EnvInt = Field(500_000, description=(
        "most conversations a job loads (memory: about 1 KB each and their text); more fails at once"))
    max_dataset_chars: EnvInt = Field(2 * 1024**3, description=(
        "most characters of messages a job loads; more fails at once"))
    download_timeout_s: EnvFloat = Field(60.0, description=(
        "seconds without data before a download attempt is abandoned"))
    download_deadline_s: EnvFloat = Field(1800.0, description=(
        "seconds a dataset download may take in all, retries included (a server sending a byte at a time is cut "
        "off)"))
    download_retries: EnvInt = Field(4, description=(
        "retries (exponential backoff) after connection errors, timeouts, short bodies, 429 and 5xx"))
    allow_file_urls: EnvBool = Field(False, description=(
        "accept any `file://` dataset URL (a local run); without it, only the files bundled in the worker's `data/` "
        "(the smoke test's `file:data/brightrun-eq12-demo.jsonl`)"))
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL"), description=(
            f"S3-compatible storage that signs download links, for the adapter's files: {APP_STORAGE_HELP} (not "
            "RunPod's network-volume S3 API: it cannot sign them)"))
    s3_access_key_id: str | None = Field(
        None, validation_alias=AliasChoices("S3_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID"),
        description="access key for S3_ENDPOINT_URL")
    s3_secret_access_key: str | None = Field(
        None, validation_alias=AliasChoices("S3_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY"),
        description="secret key for S3_ENDPOINT_URL")
    s3_bucket: str | None = Field(None, validation_alias=AliasChoices("S3_BUCKET", "BUCKET_NAME"),
                                  description="bucket the adapter's files are uploaded to")
    s3_prefix: str = Field("lora-adapters", description="key prefix: files go to `<prefix>/<job_id>/<file>`")
    s3_region: str = Field("us-east-1", description="region used to sign S3 requests (Supabase: the project's region)")
    presigned_url_expiry_s: EnvInt = Field(SIGV4_MAX_EXPIRY_S, description=(
        "lifetime of the presigned GET URLs in `model_files` (seconds; SigV4 allows at most 7 days)"))
    volume_delivery: EnvBool = Field(False, description=(
        "deliver on the network volume only: no S3; the result lists each file's path in `volume_files` and has no "
        "`model_files` (the app cannot download these)"))
    runpod_endpoint_id: str | None = Field(None, description=(
        "set by RunPod on an endpoint's workers; there a job fails at once unless Supabase, S3 storage or "
        "VOLUME_DELIVERY is set"))
    train_processes: EnvInt | None = Field(None, description=(
        "training processes, one per GPU (data parallel, torch.distributed); unset: every visible GPU, 1 on a "
        "machine without one"))
    progress_interval_s: EnvFloat = Field(10.0, description=(
        "least seconds between two progress updates within a stage (stage changes are always sent); also the app's "
        "job row"))
    supabase_url: str | None = Field(None, description=(
        "the BrightRun app's Supabase project (`https://<project-ref>.supabase.co`): with "
        "SUPABASE_SERVICE_ROLE_KEY, the worker writes the job's row (the pipeline flow) and uploads the adapter "
        "archive to its Storage"))
    supabase_service_role_key: str | None = Field(None, description=(
        "the project's service_role key (Settings → API), for the job row and the archive upload"))
    supabase_jobs_table: str = Field("pipeline_training_jobs", description=(
        "the app's table of jobs: the row whose `id` is the job's `job_id` is written live"))
    supabase_metrics_table: str = Field("pipeline_training_metrics", description=(
        "the app's table of per-step metrics (training loss, learning rate, gradient norm; validation loss per "
        "epoch)"))
    supabase_bucket: str = Field("lora-models", description="the Storage bucket the adapter archive is uploaded to")
    supabase_adapter_prefix: str = Field("adapters", description=(
        "the archive goes to `<SUPABASE_BUCKET>/<prefix>/<job_id>.tar.gz`, the path written into the row's "
        "`adapter_file_path`"))
    supabase_write_deadline_s: EnvFloat = Field(60.0, description=(
        "seconds a progress write to the job row is retried (timeouts, 5xx, 429) before it is dropped; training "
        "never waits for it"))
    supabase_final_deadline_s: EnvFloat = Field(600.0, description=(
        "seconds the final write (completed or failed) is retried before the job's RunPod result says it could not "
        "land"))
    serving_max_lora_rank: EnvInt | None = Field(None, description=(
        "`max_lora_rank` of the vLLM endpoint that serves the adapters (the BrightRun app's: 16): a job whose "
        "lora_rank exceeds it is refused in its first second; the saved adapter is checked against vLLM's LoRA "
        "rules either way (serving.py); unset: no rank limit"))

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
    def env_names(cls, name: str) -> tuple[str, ...]:
        """The environment variables setting `name` is read from, in order."""
        return tuple(cls.model_fields[name].validation_alias.choices)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Build settings from an environment mapping (tests pass a dict; the worker passes os.environ), or
        raise JobError for a deployment that could not deliver a job's result."""
        read: dict[str, tuple[str, str]] = {}  # field: (the variable it was read from, its value)
        for name in cls.model_fields:
            found = next(((n, env[n]) for n in cls.env_names(name) if env.get(n)), None)
            if found:  # trimmed: a value pasted with a newline (a key in a header) would be refused later
                read[name] = (found[0], found[1].strip())
        values: dict[str, Any] = {name: value for name, (_, value) in read.items()}
        volume = network_volume()
        if volume is None and not values.get("runpod_endpoint_id"):
            volume = LOCAL_VOLUME
        if volume is not None:  # the volume wherever it is mounted: job directories never on the container's disk
            values.setdefault("jobs_dir", volume / "lora-jobs")
            values.setdefault("model_cache_dir", volume / "models")
            values.setdefault("runpod_model_cache", volume / "huggingface-cache" / "hub")
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            raise JobError("; ".join(_env_problem(error, read) for error in exc.errors())) from None
        if settings.serving_max_lora_rank is not None and (problem := check_rank(1, settings.serving_max_lora_rank)):
            raise JobError(problem)
        _check_delivery(settings, env)
        return settings

    def warnings(self, env: Mapping[str, str]) -> list[str]:
        """What a deployment gets away with, said when the worker starts and in each job's result."""
        notes = []
        if self.s3_ignored:
            notes.append(f"S3_ENDPOINT_URL points at RunPod's network-volume S3 API "
                         f"({urlsplit(self.s3_endpoint_url).hostname}), which cannot sign download links; with "
                         "SUPABASE_URL set the adapter archive goes to Supabase Storage, so the S3_* settings are "
                         "ignored (unset them to silence this)")
        if self.on_endpoint and network_volume() is None and not env.get("JOBS_DIR"):
            notes.append(f"no network volume is mounted at {' or '.join(map(str, VOLUME_MOUNTS))}: job directories "
                         f"(checkpoints) are in {self.jobs_dir} on the container's disk and are lost when the worker "
                         "stops, and base models are downloaded again; attach a network volume to the endpoint")
        return notes


def _env_problem(error: dict, read: Mapping[str, tuple[str, str]]) -> str:
    """One invalid variable, named with its value: `DOWNLOAD_RETRIES='x' is invalid: ...`."""
    field = str(error["loc"][0])
    name, raw = read.get(field, (field.upper(), error.get("input")))
    if error["type"] == "env_bool":
        return f"environment variable {name}={raw!r} {error['msg']}"
    return f"environment variable {name}={raw!r} is invalid: {error['msg']}"


def network_volume() -> Path | None:
    return next((p for p in VOLUME_MOUNTS if p.is_dir()), None)


def is_runpod_volume_s3(url: str | None) -> bool:
    """RunPod's network-volume S3 API (`https://s3api-<datacenter>.runpod.io`): it cannot presign URLs."""
    return bool(re.fullmatch(r"s3api-[a-z0-9-]+\.runpod\.io", urlsplit(url or "").hostname or ""))


def _check_urls_and_keys(settings: WorkerSettings) -> None:
    """The storage URLs are whole http(s) URLs, the service key is one printable word, Supabase is set whole."""
    endpoint = urlsplit(settings.s3_endpoint_url or "")
    if settings.s3_endpoint_url and (endpoint.scheme not in ("http", "https") or not endpoint.hostname):
        raise JobError(f"S3_ENDPOINT_URL={redact_url(settings.s3_endpoint_url)!r} is not an http(s) URL; give it "
                       "whole, e.g. https://<project-ref>.supabase.co/storage/v1/s3")
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


def _check_delivery(settings: WorkerSettings, env: Mapping[str, str]) -> None:
    """Refuse a deployment whose adapter files the app could not download, before any job does work."""
    volume_id = env.get("NETWORK_VOLUME_ID")
    named = (f" NETWORK_VOLUME_ID={volume_id!r} is not read by this worker: it names a RunPod network volume, "
             "whose S3 API cannot sign download links." if volume_id else "")
    _check_urls_and_keys(settings)
    if settings.s3_ignored:
        return  # the archive goes to Supabase Storage; the S3 settings are unused (a warning says so)
    if is_runpod_volume_s3(settings.s3_endpoint_url):
        host = urlsplit(settings.s3_endpoint_url).hostname
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
    if not 1 <= settings.presigned_url_expiry_s <= SIGV4_MAX_EXPIRY_S:
        raise JobError(f"PRESIGNED_URL_EXPIRY_S={settings.presigned_url_expiry_s} is outside 1..604800: S3 signatures "
                       "(SigV4) last at most 7 days, so longer links would fail when the app fetches them")
    if settings.s3_configured and settings.volume_delivery:
        raise JobError("both S3 storage (S3_ENDPOINT_URL, S3_BUCKET) and VOLUME_DELIVERY=true are set: choose one")
    delivered = settings.s3_configured or settings.volume_delivery or settings.supabase_configured
    if settings.on_endpoint and not delivered:
        raise JobError(
            "no storage for the adapter's files: on a RunPod endpoint the app needs them where it can download them. "
            "Set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY (the app's pipeline flow: the job row and the archive in "
            f"Supabase Storage), or S3_ENDPOINT_URL, S3_BUCKET, S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY "
            f"({APP_STORAGE_HELP}), or set VOLUME_DELIVERY=true to keep the files on the network volume (the app then "
            f"gets no files){'.' + named if named else ''}")
