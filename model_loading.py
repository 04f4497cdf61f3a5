"""Model loading: the 4-bit base (bitsandbytes NF4, MoE experts per expert), its 4-bit copy kept for later jobs,
and the LoRA layers (PEFT) and their targets. `train_lora.py` calls these in its setup; nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from architecture import per_expert_model_class, per_expert_names
from compat import lora_targets_as_named
from device import free_memory
from files import real_dir
from job import Hyperparameters, JobError

log = logging.getLogger(__name__)


def quantization_config(compute_dtype):
    """NF4 with double quantization: the QLoRA recipe."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


ROUTED_EXPERTS = r".*\.experts\.\d+\..*"  # module names of per-expert layers (see architecture.PerExpertMoE)


def lora_config(hp: Hyperparameters, target_modules: list[str] | str, exclude_modules: str | None = None):
    """LoRA with the job's rank, alpha and dropout on `target_modules`, none on `exclude_modules`."""
    return LoraConfig(r=hp.lora_rank, lora_alpha=hp.effective_lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=target_modules, exclude_modules=exclude_modules, bias="none",
                      task_type="CAUSAL_LM")


def lora_targets(model, requested: str | list[str]) -> list[str] | str:
    """`all-linear`: every linear layer of the decoder, without lm_head and without the routed MoE
    experts (hundreds of small adapters per layer, each seen by few tokens); attention,
    linear-attention and shared-expert layers are adapted. Names are module-name suffixes, as PEFT
    matches them; a name routed experts share (`gate_proj`) is qualified by its parent
    (`shared_expert.gate_proj`) so it cannot match them. A list is used as given."""
    if requested != "all-linear":
        return requested
    linear = [name for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and name.rsplit(".", 1)[-1] != "lm_head"]
    routed = {name.rsplit(".", 1)[-1] for name in linear if ".experts." in name}
    names = {".".join(name.split(".")[-2:]) if name.rsplit(".", 1)[-1] in routed else name.rsplit(".", 1)[-1]
             for name in linear if ".experts." not in name}
    return sorted(names)


def causal_lm_class(base_model: Path, trust_remote_code: bool = False):
    """The model class to load: transformers' own, or for fused-MoE models (Qwen3-Next, Qwen3-MoE, ...)
    the same class with per-expert layers that bitsandbytes quantizes while loading."""
    config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    names = per_expert_names(config.model_type)
    if names is None or trust_remote_code or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    return per_expert_model_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], names)


COPY_FORMAT = 1  # bump when what the worker writes as a 4-bit copy changes


def quantized_copy_dir(base_model: Path, compute_dtype, root: Path, model_class) -> Path:
    """Where the 4-bit copy of `base_model` lives under `root`, named by a hash of everything that
    decides its bytes: the model's files (names, sizes, times), the model class (per-expert or
    stock), the quantization settings and compute dtype, and the torch, bitsandbytes and
    transformers versions. A changed model, setting or library never loads a stale copy."""
    files = sorted(p for p in base_model.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    key = json.dumps([[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
                     + [COPY_FORMAT, f"{model_class.__module__}.{model_class.__qualname__}",
                        quantization_config(compute_dtype).to_json_string(),
                        *(version(m) for m in ("torch", "bitsandbytes", "transformers"))])
    return root / f"{base_model.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _set_aside(path: Path) -> None:
    """Rename `path` out of the way (atomic: no reader sees half of it go), then delete it."""
    aside = path.with_name(f"{path.name}.bad-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("could not set %s aside (%s)", path, exc)
        return
    shutil.rmtree(aside, ignore_errors=True)


def _sweep(root: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove what killed workers left under `root`: unfinished copies (`*.tmp-*`) and copies being
    deleted (`*.bad-*`) older than a day (a live writer's directory is younger)."""
    for leftover in [*root.glob("*.tmp-*"), *root.glob("*.bad-*")]:
        try:
            if time.time() - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # another worker swept it first
            pass


def _keep_quantized_copy(model, copy: Path) -> None:
    """Save `model` as `copy`: written into a directory of its own, renamed into place when complete.
    Best effort: any failure (a full or read-only volume, another worker first) is logged, not raised."""
    tmp = None
    try:
        real_dir(copy.parent, root=copy.parent.parent, mode=0o755)  # a link planted as `.quantized` is refused
        tmp = Path(tempfile.mkdtemp(dir=copy.parent, prefix=f"{copy.name}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the copy from workers running as another user
        model.save_pretrained(tmp, save_original_format=False, max_shard_size="5GB")
        if copy.exists() and not (copy / "config.json").is_file():
            _set_aside(copy)  # an incomplete leftover would block the rename forever
        os.replace(tmp, copy)
        log.info("kept a 4-bit copy of the base model at %s for later jobs", copy)
    except JobError:  # SIGTERM ended the job
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as SafetensorError, not OSError
        if tmp is not None and (tmp / "config.json").is_file() and (copy / "config.json").is_file():
            log.info("another worker kept the 4-bit copy at %s first", copy)
        else:
            log.warning("could not keep a 4-bit copy of the base model at %s (%s: %s); later jobs quantize it again",
                        copy, type(exc).__name__, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def same_kernels_in_eval(model):
    """Make a CPU model compute in eval what it computes in training, and return it.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 switches a 4-bit layer in eval without gradients to
    a packed kernel of its own: bf16 scales (logits ~1e-3 off the training kernel's) and only for
    layers whose output size is a multiple of 32 (Qwen3-Next's `in_proj_ba` is not: it fails). The
    validation loss and reloaded adapters are then measured with the kernel that trained them."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_base_model(base_model: Path, device: str, compute_dtype, trust_remote_code: bool = False,
                    attention: str = "sdpa", quantized_cache: Path | None = None, keep_copy: bool = True):
    """The frozen base in 4-bit, and where it came from.

    With `quantized_cache`, the first job saves the quantized model there once (`<name>-<hash>/`),
    and later jobs load that copy: a quarter of the bytes to read from the volume and no
    quantization. A copy that does not load, or loads with a key missing or left over, is set aside
    once the base model itself has loaded (so a fault that is not the copy's keeps it), and replaced.
    """
    model_class = causal_lm_class(base_model, trust_remote_code)
    common = dict(dtype=compute_dtype, attn_implementation=attention, trust_remote_code=trust_remote_code,
                  device_map={"": torch.cuda.current_device()} if device == "cuda" else None)
    copy = bad_copy = None
    if quantized_cache is not None and not trust_remote_code:
        copy = quantized_copy_dir(base_model, compute_dtype, quantized_cache, model_class)
        if quantized_cache.is_dir() and not quantized_cache.is_symlink():  # never sweep where a link points
            _sweep(quantized_cache)
    if copy is not None and not copy.is_symlink() and (copy / "config.json").is_file():
        tried = copy.stat().st_ino  # which copy this was: another worker may put a new one in its place
        try:
            model, info = model_class.from_pretrained(copy, output_loading_info=True, **common)
            wrong = {k: sorted(v)[:3] for k, v in info.items() if k.endswith("_keys") and v}
            if not wrong:
                return (same_kernels_in_eval(model) if device == "cpu" else model), "4-bit copy"
            del model
            reason = f"keys that do not match the model: {wrong}"
        except (torch.OutOfMemoryError, JobError):  # JobError: SIGTERM ended the job
            raise
        except Exception as exc:  # noqa: BLE001 - judged below: bad if the base model loads where the copy did not
            reason = f"{type(exc).__name__}: {exc}"
        free_memory(device)  # the rejected copy's 4-bit weights, before the base model loads beside them
        bad_copy = tried
        log.warning("the 4-bit copy %s could not be used (%s); quantizing the base model again", copy, reason)
    model = model_class.from_pretrained(base_model, quantization_config=quantization_config(compute_dtype), **common)
    if copy is not None and keep_copy:  # one writer (the first rank of a job in several processes)
        if bad_copy is not None and copy.exists() and copy.stat().st_ino == bad_copy:  # not a newer one in its place
            _set_aside(copy)
        if not (copy / "config.json").is_file():
            _keep_quantized_copy(model, copy)
    return (same_kernels_in_eval(model) if device == "cpu" else model), "quantized while loading"


def keep_copy_after_training(model, base_model: Path, compute_dtype, quantized_cache: Path,
                             trust_remote_code: bool = False) -> None:
    """The 4-bit copy of a job in several processes, written by rank 0 once training is over: written while loading,
    the other ranks would wait for it in their first collective (the ~42 GB of Qwen3-Next-80B on a slow volume: past
    NCCL's timeout). The LoRA layers are taken off (not merged) first: what is saved is the base as it was loaded."""
    if trust_remote_code:  # their own modelling code may change what a copy holds: never kept (load_base_model)
        return
    try:
        copy = quantized_copy_dir(base_model, compute_dtype, quantized_cache, causal_lm_class(base_model))
        if (copy / "config.json").is_file():  # another worker's, written meanwhile, or one that would not load
            log.info("a 4-bit copy is already at %s; not writing another", copy)  # (a later single-process job's)
            return
        _keep_quantized_copy(model.unload(), copy)
    except Exception as exc:  # noqa: BLE001 - the adapter is saved: a copy that cannot be written costs later jobs only
        log.warning("could not keep a 4-bit copy of the base model (%s: %s); later jobs quantize it again",
                    type(exc).__name__, exc)


def enable_recomputation(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: the frozen inputs need
    no gradient trick, and dropout's random state is replayed)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


KBIT_PREPARATION = "frozen base in compute dtype, LoRA fp32; recomputation non-reentrant where on"  # as recorded


def load_model(base_model: Path, hp: Hyperparameters, device: str, compute_dtype, trust_remote_code: bool = False,
               attention: str = "sdpa", quantized_cache: Path | None = None, recompute: bool = True,
               keep_copy: bool = True):
    """The base model in 4-bit (MoE experts too) with trainable LoRA layers on top; and where the
    4-bit weights came from.

    k-bit preparation is done here rather than with PEFT's `prepare_model_for_kbit_training`, which
    casts every non-4-bit weight (embeddings, lm_head, norms) to fp32: 4.4 GB more for Qwen2.5-7B's
    embeddings alone. The frozen weights stay in the compute dtype; LoRA weights are fp32 (KBIT_PREPARATION).
    """
    model, source = load_base_model(base_model, device, compute_dtype, trust_remote_code, attention, quantized_cache,
                                    keep_copy)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    if recompute:
        enable_recomputation(model)
    torch.manual_seed(hp.seed)  # LoRA A matrices are initialised randomly
    # Routed experts are never adapted, whatever the targets (a listed `gate_proj` would otherwise put
    # an adapter on each of Qwen3-Next-80B's 24,576 expert gate projections).
    experts = ROUTED_EXPERTS if any(re.fullmatch(ROUTED_EXPERTS, name) for name, _ in model.named_modules()) else None
    with lora_targets_as_named():
        return get_peft_model(model, lora_config(hp, lora_targets(model, hp.lora_target_modules), experts)), source
