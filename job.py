"""The job's input, the single source of every default and limit a job can set; `JobError`; redaction.

`JobInput` is what the BrightRun app POSTs as `input` (both shapes of `hyperparameters` and
`gpu_config` it sends today are accepted); what the deployment sets in the environment is
`settings.WorkerSettings`. No torch, so a bad job is answered before any heavy import.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

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

    base_model: str | None = Field(None, description=(
        "Hub id (`Qwen/Qwen2.5-7B-Instruct`) or local path; default: the worker's DEFAULT_BASE_MODEL"))
    learning_rate: float = Field(2e-4, ge=1e-5, le=1e-3, description="Peak learning rate (cosine decay after warmup)")
    batch_size: int = Field(4, ge=1, le=64, description="Sequences per optimizer step (packed sequences when packing)")
    micro_batch_size: int | None = Field(None, ge=1, le=64, description=(
        "Sequences per forward pass; default batch_size; the rest is gradient accumulation"))
    epochs: int = Field(
        3, ge=1, le=20, validation_alias=AliasChoices("epochs", "num_epochs"),
        description="Passes over the dataset (alias num_epochs)")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description=(
        "Stop after this many optimizer steps (default: run all epochs)"))
    lora_rank: int = Field(
        16, ge=4, le=128, validation_alias=AliasChoices("lora_rank", "rank"), description="LoRA rank r (alias rank)")
    lora_alpha: float | None = Field(
        None, gt=0, le=1024, validation_alias=AliasChoices("lora_alpha", "alpha"),
        description="LoRA alpha (alias alpha); default 2 x rank")
    lora_dropout: float = Field(
        0.05, ge=0.0, le=0.5, validation_alias=AliasChoices("lora_dropout", "dropout"),
        description="LoRA dropout (alias dropout)")
    lora_target_modules: str | list[str] = Field("all-linear", description=(
        "`all-linear` (every linear layer of the decoder, not lm_head) or a list of module names; routed MoE experts "
        "are never adapted"))
    max_seq_length: int = Field(2048, ge=64, le=32768, description=(
        "Tokens per packed sequence; longer conversations lose their oldest turns first"))
    packing: bool = Field(True, description=(
        "Pack several conversations into one sequence, kept apart in every layer (a block-diagonal attention mask; "
        "linear-attention and state-space layers run per conversation); architectures where that cannot be done "
        "train unpacked, with a warning"))
    warmup_steps: int | None = Field(None, ge=0, le=100_000, description=(
        "Linear warmup steps; default warmup_ratio x total steps"))
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description=(
        "Warmup as a fraction of the total steps, when warmup_steps is not given"))
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0.0, le=100.0, description="Gradient clipping norm")
    early_stopping_patience: int = Field(EARLY_STOPPING_PATIENCE, ge=0, le=20, description=(
        "With a validation set: stop once the validation loss has not improved for this many epochs (0: train every "
        "epoch); either way the adapter delivered is the epoch with the lowest validation loss"))
    val_fraction: float | None = Field(None, ge=0.0, le=0.5, description=(
        "Share of the conversations held out for validation_loss (whole conversations: a BrightRun conversation's "
        f"pairs stay together); default {VALIDATION_SHARE:g}, at most {VALIDATION_MAX_HELD_OUT}, when the dataset has "
        f"at least {VALIDATION_MIN_CONVERSATIONS} conversations, else none; 0: none"))
    gradient_checkpointing: Literal["auto"] | bool = Field("auto", description=(
        "Recompute activations in backward (less memory; with the base frozen, about 1.5x the compute per token); "
        "`auto`: only when the micro-batch would not fit the GPU without it"))
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "Precision of the forward and backward passes; `auto`: bfloat16 on GPUs that have it, float16 on older ones, "
        "float32 on the CPU"))
    adapter_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description=(
        "Precision of the saved LoRA weights; `auto`: bfloat16 (float16 on GPUs without bf16), half the size of "
        "float32, which trains them"))
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Seed for shuffling, the split and LoRA init")
    checkpoint_steps: int = Field(50, ge=1, le=1_000_000, description=(
        "Write a resumable checkpoint every this many steps"))
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

    count: int = Field(validation_alias=AliasChoices("count", "num_gpus"), ge=1, le=8,
                       description="GPUs requested (alias num_gpus)")
    type: str | None = Field(None, validation_alias=AliasChoices("type", "gpu_type"),
                             description="GPU type requested (alias gpu_type)")
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

    job_id: str | None = Field(None, description=(
        "The app's training job id; names the job directory (default: the RunPod job id)"))
    dataset_url: str = Field(description="Signed http(s) URL of the dataset (JSONL, JSON array or gzip)")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training settings")
    gpu_config: GpuConfig | None = Field(None, description="GPUs requested by the app")
    callback_url: str | None = Field(None, description="Optional URL for one best-effort POST of the final status")
    retrain: bool = Field(False, description=(
        "Train again even if this job_id already completed (its stored result is returned otherwise)"))
    max_invalid_fraction: float = Field(0.1, ge=0.0, le=1.0, description=(
        "Fail when more than this fraction of the dataset's non-blank lines is invalid"))

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
                problems.append(f"{section}.{name}={values[name]!r} and {section}.{alias}={values[alias]!r} "
                                "disagree; send one")
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
        raise JobError("invalid job input: expected an object with dataset_url and hyperparameters, "
                       f"got {type(raw).__name__}")
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


def job_fingerprint(hp: Hyperparameters, base_model: str, dataset: str) -> str:
    """What makes two runs the same job, as a hash: the settings, the base model and the dataset (its sha256 for
    training; for a submission before the download, its URL without the signature)."""
    identity = json.dumps([hp.model_dump(mode="json"), str(base_model), dataset], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()
