"""Every use of another library's private API, grouped by library. Each names the version it was written against
and why the public API does not serve; tests/test_compat.py fails when a library changes under one (the name gone,
or what it does changed) and when an installed version is not the one named in WRITTEN_AGAINST.

Each library is imported inside the functions that use it: the modules that import this one need one library each
(progress and storage runpod; architecture and plan transformers; model_loading and adapter peft), the training
processes never need runpod, and `import runpod` takes about 1.8 s, transformers about 4 s.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

# The library versions the workarounds below were written against; requirements.txt pins the same ones. A version
# bump fails tests/test_compat.py until this is changed, after the workarounds of that library are read again.
WRITTEN_AGAINST = {
    "runpod": "1.12.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
}


# ---------------------------------------------------------------------------- runpod 1.12.0

def post_progress(job: dict, payload: dict, timeout_s: float | None = None) -> bool:
    """Send one progress update of `job` to RunPod (`RUNPOD_WEBHOOK_POST_OUTPUT`) and wait until it is sent, so that
    updates sent one after another arrive in that order. True once the send has ended (the SDK logs a failed POST and
    never raises it); False when `timeout_s` passed first (the send goes on in its thread).

    runpod 1.12's `runpod.serverless.progress_update` starts a thread per update and returns at once: two updates a
    moment apart can arrive in either order. Its `rp_progress._thread_target(job, progress)` is that thread's body: it
    sends on a new event loop and returns when the POST has been answered. It runs here in a thread of its own, joined:
    the handler runs on the thread of the SDK's event loop (`rp_job.run_job` calls it there), where a second loop
    cannot run, and `_thread_target` sets and closes an event loop as the current one of the thread it runs in."""
    from runpod.serverless.modules.rp_progress import _thread_target

    def send() -> None:
        try:
            _thread_target(job, payload)
        except Exception as exc:  # noqa: BLE001 - progress is best effort: a failed update never fails the job
            log.warning("progress update of job %s not sent: %s: %s", job.get("id"), type(exc).__name__, exc)

    thread = threading.Thread(target=send, name="progress", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def pinned_session(ip: str):
    """A `requests` session whose http(s) connections dial only `ip`, whatever the URL's host, with the URL's host
    kept in the Host header, the TLS SNI and the certificate check: the callback POST goes to the address
    `rp_ssrf.resolve_and_validate` checked, with no DNS lookup in between that could return another one.

    runpod 1.12's `rp_ssrf.safe_get` pins its GETs this way, but offers no POST; its `rp_ssrf._build_pinned_session`
    builds the session safe_get uses."""
    from runpod.serverless.utils import rp_ssrf

    return rp_ssrf._build_pinned_session(ip)


# ---------------------------------------------------------------------------- transformers 5.23.0

def conversion_patterns(model_type: str) -> list[tuple[list[str], list[str]]] | None:
    """transformers' checkpoint conversion mapping for `model_type` (how it renames and fuses a checkpoint's tensors
    on load) as (source patterns, target patterns) per converter, as the mapping writes them; None when the model type
    has no mapping or any entry of it is not a `WeightConverter` (a rename, a prefix change).

    transformers 5.23 rewrites a converter's public `source_patterns`/`target_patterns` for its reverse mapping (dots
    escaped or not, `^` anchors, capturing groups); the patterns as written are kept only in the private
    `_original_source_patterns`/`_original_target_patterns` of `WeightTransform`."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    mapping = get_checkpoint_conversion_mapping(model_type) or []
    if not mapping or not all(isinstance(t, WeightConverter) for t in mapping):
        return None
    return [(list(c._original_source_patterns), list(c._original_target_patterns)) for c in mapping]


def supports_flex_attention(model_class) -> bool:
    """Whether transformers implements flex attention for `model_class`: its private class flag `_supports_flex_attn`
    (the public way, `attn_implementation="flex_attention"`, says so only by failing to load a model)."""
    return bool(getattr(model_class, "_supports_flex_attn", False))


# ---------------------------------------------------------------------------- peft 0.21.2

def stock_loadable_config(config: dict, model_type: str) -> dict:
    """adapter_config.json as stock PEFT loads it whole onto the stock transformers model.

    For MoE model types whose experts transformers 5 fuses (qwen3_next, DeepSeek, GLM-MoE, ...), PEFT 0.21
    rewrites every LoRA target named like an expert projection (`gate_proj`, `up_proj`, `down_proj`) into
    the fused experts' parameters, the shared expert's and dense MLPs' too (huggingface/peft#3711): a stock
    load then drops their trained weights, or fails on `lora_dropout`. Named as `target_parameters`
    (`shared_expert.gate_proj.weight`) they load onto the same layers, with nothing rewritten: PEFT's
    4-bit LoRA layer takes them on a 4-bit base, and its parameter LoRA (which needs dropout 0; dropout
    does nothing at inference) on a 16-bit one. The routed experts' exclusion is dropped: in the stock
    architecture they are parameters no module target can reach. Other model types: unchanged.

    Which targets PEFT rewrites is in its private `_MODEL_TO_CONVERSION_PATTERN` and `_MOE_TARGET_MODULE_MAPPING`."""
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING

    rewritten = set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))
    targets = config.get("target_modules")
    moved = sorted(t for t in targets or [] if isinstance(targets, list) and t.rsplit(".", 1)[-1] in rewritten)
    if not moved:
        return config
    return {**config, "target_modules": sorted(set(targets) - set(moved)),
            "target_parameters": sorted(set(config.get("target_parameters") or [])
                                        | {f"{t}.weight" for t in moved}),
            "exclude_modules": None, "lora_dropout": 0.0}


@contextmanager
def lora_targets_as_named():
    """PEFT 0.21 rewrites LoRA targets ending in gate_proj/up_proj/down_proj of Qwen-MoE model types
    into the fused 3D expert tensors of transformers 5 (for adapters trained on transformers 4), the
    shared expert's too (huggingface/peft#3711). Our experts are per-expert 4-bit layers LoRA does not
    touch, so while adapters are attached or loaded here the targets are used as named: PEFT's
    `convert_peft_config_for_transformers` (in its private module `utils.transformers_weight_conversion`) is
    replaced by a no-op for the block."""
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original
