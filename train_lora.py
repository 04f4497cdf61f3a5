"""QLoRA training of a chat adapter: 4-bit NF4 base (bitsandbytes) + LoRA (PEFT), assistant tokens only.

The recipe reads top to bottom:
    setup  - find the base model, load the tokenizer and its chat template, label and pack the data,
             check the job fits the GPU (from config.json), load the base in 4-bit, add LoRA
    train  - AdamW (8-bit, paged on GPU), cosine schedule with warmup, gradient accumulation and
             clipping; loss = mean over the trained tokens of the optimizer step; resumable
             checkpoints every N steps / M minutes / on SIGTERM
    save   - adapter, tokenizer + template, generation config, training_config.json, metrics.json,
             the per-step log and loss chart; written to a temporary directory and renamed into place

The CPU path is the same QLoRA path the GPU runs (bitsandbytes 4-bit layers run on CPU), in fp32.

    python train_lora.py train    --dataset FILE --base-model DIR --output DIR [--epochs N ...]
    python train_lora.py preview  --dataset FILE --base-model DIR [--max-seq-length N] [--limit K] [--json]
    python train_lora.py estimate --base-model DIR_OR_ID [--max-seq-length N] [--batch-size B] [--gpu-memory-gb G] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from chat_labels import (IGNORE, Example, SkipExample, collate, end_of_turn_token, pack_examples, prepare_chat_template,
                         tokenize_conversation, trained_runs)
from base_models import (LOSS_CHUNK_TOKENS, does_not_fit_message, estimate_job_memory, experts_in_4bit,
                         isolate_packed_examples, load_config, meta_model, packing_support, per_expert_model_class,
                         per_expert_names, resolve_base_model, token_mixers)
from checkpoints import Stopped, load_latest_checkpoint, save_checkpoint, stop_on_sigterm
from dataset_loader import DatasetError, load_dataset
from job import VALIDATION_MAX_HELD_OUT, VALIDATION_MIN_CONVERSATIONS, VALIDATION_SHARE, Hyperparameters, JobError, parse_hyperparameters

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


# ---------------------------------------------------------------------------- setup: base model

def select_precision(setting: str = "auto"):
    """(device, compute dtype): for "auto", bf16 on GPUs with compute capability >= 8.0, fp16 below, fp32 on the
    CPU; another setting names the dtype (bf16 on the CPU runs the GPU's 16-bit path there, for tests)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting != "auto":
        return device, getattr(torch, setting)
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability()
        return "cuda", torch.bfloat16 if major >= 8 else torch.float16
    return "cpu", torch.float32


def select_attention(device: str, micro_batch_size: int, packing: bool, supports_flex: bool) -> str:
    """How attention keeps packed examples apart, computing only within each one where the GPU allows it:
    flash-attention 2 where it is installed and micro-batches hold one sequence (transformers 5.23 separates
    packed examples by position_ids, its varlen path, only at batch size 1); else on a GPU PyTorch's flex
    attention with a document mask (`collate`'s BlockMask; compiled by Triton, which needs a C compiler), for
    the architectures transformers supports it on (`supports_flex`; not Qwen3-Next in 5.23);
    else sdpa with a block-diagonal 4D mask, which computes every pair and masks them (the CPU: flex attention
    has no backward there)."""
    import importlib.util
    import shutil

    if device == "cuda" and micro_batch_size == 1 and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    flex = importlib.util.find_spec("triton") and (shutil.which("cc") or shutil.which("gcc"))
    return "flex_attention" if device == "cuda" and packing and supports_flex and flex else "sdpa"


def quantization_config(compute_dtype):
    """NF4 with double quantization: the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=compute_dtype)


ROUTED_EXPERTS = r".*\.experts\.\d+\..*"  # module names of per-expert layers (see base_models.PerExpertMoE)


def lora_config(hp: Hyperparameters, target_modules: list[str] | str, exclude_modules: str | None = None):
    """LoRA with the job's rank, alpha and dropout on `target_modules`, none on `exclude_modules`."""
    from peft import LoraConfig

    return LoraConfig(r=hp.lora_rank, lora_alpha=hp.effective_lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=target_modules, exclude_modules=exclude_modules, bias="none", task_type="CAUSAL_LM")


def lora_targets(model, requested: str | list[str]) -> list[str] | str:
    """`all-linear`: every linear layer of the decoder, without lm_head and without the routed MoE
    experts (hundreds of small adapters per layer, each seen by few tokens); attention,
    linear-attention and shared-expert layers are adapted. Names are module-name suffixes, as PEFT
    matches them; a name routed experts share (`gate_proj`) is qualified by its parent
    (`shared_expert.gate_proj`) so it cannot match them. A list is used as given."""
    if requested != "all-linear":
        return requested
    import bitsandbytes as bnb
    import torch

    linear = [name for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and name.rsplit(".", 1)[-1] != "lm_head"]
    routed = {name.rsplit(".", 1)[-1] for name in linear if ".experts." in name}
    names = {".".join(name.split(".")[-2:]) if name.rsplit(".", 1)[-1] in routed else name.rsplit(".", 1)[-1]
             for name in linear if ".experts." not in name}
    return sorted(names)


def stock_loadable_config(config: dict, model_type: str) -> dict:
    """adapter_config.json as stock PEFT loads it whole onto the stock transformers model.

    For MoE model types whose experts transformers 5 fuses (qwen3_next, DeepSeek, GLM-MoE, ...), PEFT 0.21
    rewrites every LoRA target named like an expert projection (`gate_proj`, `up_proj`, `down_proj`) into
    the fused experts' parameters, the shared expert's and dense MLPs' too (huggingface/peft#3711): a stock
    load then drops their trained weights, or fails on `lora_dropout`. Named as `target_parameters`
    (`shared_expert.gate_proj.weight`) they load onto the same layers, with nothing rewritten: PEFT's
    4-bit LoRA layer takes them on a 4-bit base, and its parameter LoRA (which needs dropout 0; dropout
    does nothing at inference) on a 16-bit one. The routed experts' exclusion is dropped: in the stock
    architecture they are parameters no module target can reach. Other model types: unchanged."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:  # a PEFT without the conversion: nothing to work around
        return config
    rewritten = set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))
    targets = config.get("target_modules")
    moved = sorted(t for t in targets or [] if isinstance(targets, list) and t.rsplit(".", 1)[-1] in rewritten)
    if not moved:
        return config
    return {**config, "target_modules": sorted(set(targets) - set(moved)),
            "target_parameters": sorted(set(config.get("target_parameters") or []) | {f"{t}.weight" for t in moved}),
            "exclude_modules": None, "lora_dropout": 0.0}


@contextmanager
def lora_targets_as_named():
    """PEFT 0.21 rewrites LoRA targets ending in gate_proj/up_proj/down_proj of Qwen-MoE model types
    into the fused 3D expert tensors of transformers 5 (for adapters trained on transformers 4), the
    shared expert's too (huggingface/peft#3711). Our experts are per-expert 4-bit layers LoRA does not
    touch, so while adapters are attached or loaded here the targets are used as named."""
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def load_tokenizer(base_model: Path, trust_remote_code: bool = False):
    """The tokenizer with the chat template training uses (its own, or a default from tokens it has; the
    system prompt kept where the template would lose it), and how that template renders (a ChatFormat)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    try:
        chat_format = prepare_chat_template(tokenizer)
    except SkipExample as exc:
        raise JobError(f"the base model {base_model.name} cannot be used for chat training: {exc}") from None
    if chat_format.system_prompt != "template":
        log.info("the chat template of %s drops or refuses a system prompt: it is merged into the %s", base_model.name,
                 chat_format.system_prompt)
    return tokenizer, chat_format


def causal_lm_class(base_model: Path, trust_remote_code: bool = False):
    """The model class to load: transformers' own, or for fused-MoE models (Qwen3-Next, Qwen3-MoE, ...)
    the same class with per-expert layers that bitsandbytes quantizes while loading."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    names = per_expert_names(config.model_type)
    if names is None or trust_remote_code or type(config) not in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return per_expert_model_class(AutoModelForCausalLM._model_mapping[type(config)], names)


COPY_FORMAT = 1  # bump when what the worker writes as a 4-bit copy changes


def quantized_copy_dir(base_model: Path, compute_dtype, root: Path, model_class) -> Path:
    """Where the 4-bit copy of `base_model` lives under `root`, named by a hash of everything that
    decides its bytes: the model's files (names, sizes, times), the model class (per-expert or
    stock), the quantization settings and compute dtype, and the torch, bitsandbytes and
    transformers versions. A changed model, setting or library never loads a stale copy."""
    import hashlib
    from importlib.metadata import version

    files = sorted(p for p in base_model.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    key = json.dumps([[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
                     + [COPY_FORMAT, f"{model_class.__module__}.{model_class.__qualname__}",
                        quantization_config(compute_dtype).to_json_string(),
                        *(version(m) for m in ("torch", "bitsandbytes", "transformers"))])
    return root / f"{base_model.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _set_aside(path: Path) -> None:
    """Rename `path` out of the way (atomic: no reader sees half of it go), then delete it."""
    import uuid

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
    import tempfile

    tmp = None
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
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
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_base_model(base_model: Path, device: str, compute_dtype, trust_remote_code: bool = False,
                    attention: str = "sdpa", quantized_cache: Path | None = None):
    """The frozen base in 4-bit, and where it came from.

    With `quantized_cache`, the first job saves the quantized model there once (`<name>-<hash>/`),
    and later jobs load that copy: a quarter of the bytes to read from the volume and no
    quantization. A copy that does not load, or loads with a key missing or left over, is set aside
    once the base model itself has loaded (so a fault that is not the copy's keeps it), and replaced.
    """
    import torch

    model_class = causal_lm_class(base_model, trust_remote_code)
    common = dict(dtype=compute_dtype, attn_implementation=attention, device_map={"": 0} if device == "cuda" else None,
                  trust_remote_code=trust_remote_code)
    copy = bad_copy = None
    if quantized_cache is not None and not trust_remote_code:
        copy = quantized_copy_dir(base_model, compute_dtype, quantized_cache, model_class)
        if quantized_cache.is_dir():
            _sweep(quantized_cache)
    if copy is not None and (copy / "config.json").is_file():
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
        bad_copy = tried
        log.warning("the 4-bit copy %s could not be used (%s); quantizing the base model again", copy, reason)
    model = model_class.from_pretrained(base_model, quantization_config=quantization_config(compute_dtype), **common)
    if copy is not None:
        if bad_copy is not None and copy.exists() and copy.stat().st_ino == bad_copy:  # not a newer one in its place
            _set_aside(copy)
        if not (copy / "config.json").is_file():
            _keep_quantized_copy(model, copy)
    return (same_kernels_in_eval(model) if device == "cpu" else model), "quantized while loading"


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: the frozen inputs need
    no gradient trick, and dropout's random state is replayed)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def load_model(base_model: Path, hp: Hyperparameters, device: str, compute_dtype, trust_remote_code: bool = False,
               attention: str = "sdpa", quantized_cache: Path | None = None, checkpointing: bool = True):
    """The base model in 4-bit (MoE experts too) with trainable LoRA layers on top; and where the
    4-bit weights came from.

    k-bit preparation is done here rather than with PEFT's `prepare_model_for_kbit_training`, which
    casts every non-4-bit weight (embeddings, lm_head, norms) to fp32: 4.4 GB more for Qwen2.5-7B's
    embeddings alone. The frozen weights stay in the compute dtype; LoRA weights are fp32.
    """
    import torch
    from peft import get_peft_model

    model, source = load_base_model(base_model, device, compute_dtype, trust_remote_code, attention, quantized_cache)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        enable_checkpointing(model)
    torch.manual_seed(hp.seed)  # LoRA A matrices are initialised randomly
    # Routed experts are never adapted, whatever the targets (a listed `gate_proj` would otherwise put
    # an adapter on each of Qwen3-Next-80B's 24,576 expert gate projections).
    import re

    experts = ROUTED_EXPERTS if any(re.fullmatch(ROUTED_EXPERTS, name) for name, _ in model.named_modules()) else None
    with lora_targets_as_named():
        return get_peft_model(model, lora_config(hp, lora_targets(model, hp.lora_target_modules), experts)), source


def check_fits(base_path: Path, hp: Hyperparameters, name: str, trust_remote_code: bool = False):
    """The job's GPU memory estimate from `config.json` alone (no weight read), for the memory free on this
    worker's GPU; JobError naming what to change when even micro-batch 1 cannot fit. No limit on the CPU."""
    import torch

    device, compute_dtype = select_precision(hp.compute_dtype)
    if device == "cuda":
        # A warm worker's previous job may still hold GPU memory: its model until collected (reference
        # cycles), and blocks cached by PyTorch's allocator, which mem_get_info counts as used.
        gc.collect()
        torch.cuda.empty_cache()
    free_gb = torch.cuda.mem_get_info()[0] / 1024**3 if device == "cuda" else None
    config = load_config(base_path)
    estimate = estimate_job_memory(config, max_seq_length=hp.max_seq_length,
                                   batch_size=hp.effective_micro_batch_size, lora_rank=hp.lora_rank, gpu_memory_gb=free_gb,
                                   gradient_checkpointing=hp.gradient_checkpointing,  # "auto": decided from memory
                                   quantize_experts=experts_in_4bit(config) and not trust_remote_code,
                                   compute_bytes=torch.tensor([], dtype=compute_dtype).element_size())
    if not estimate.fits:
        raise JobError(does_not_fit_message(name, estimate, hp.max_seq_length))
    return estimate


def label_conversations(tokenizer, conversations: list[dict], max_seq_length: int, eot_text: str):
    """Tokenize and label every conversation; returns (examples, length report)."""
    examples, skipped, dropped = [], [], 0
    for i, conversation in enumerate(conversations):
        try:
            examples.append(tokenize_conversation(tokenizer, conversation, max_seq_length, eot_text))
        except SkipExample as exc:
            dropped += 1
            if len(skipped) < 100:  # every one counted, the first ones quoted
                skipped.append({"example": i + 1, "message": f"example {i + 1}: {exc}"})
    report = {
        "examples": len(examples),
        "shortened": sum(1 for e in examples if e.dropped_messages),
        "truncated": sum(1 for e in examples if e.truncated),
        "dropped": dropped,
        "problems": skipped,
    }
    return examples, report


def split_validation(conversations: list[dict], fraction: float | None, seed: int) -> tuple[list[dict], list[dict], str | None]:
    """(training, validation, a warning or None). Whole conversations are held out: lines with the same
    `conversation_id` (the pairs of one BrightRun conversation, which share their history) stay on one
    side. `fraction` None is the default rule (job.VALIDATION_SHARE of the conversations, at most
    VALIDATION_MAX_HELD_OUT, once there are VALIDATION_MIN_CONVERSATIONS); 0 holds out nothing."""
    groups: dict[tuple, list[int]] = {}
    for i, conversation in enumerate(conversations):
        key = ("id", conversation["conversation_id"]) if "conversation_id" in conversation else ("line", i)
        groups.setdefault(key, []).append(i)
    if fraction == 0:
        return conversations, [], None
    if fraction is None and len(groups) < VALIDATION_MIN_CONVERSATIONS:
        return conversations, [], (f"no validation loss: the dataset has {len(groups)} conversations, fewer than the "
                                   f"{VALIDATION_MIN_CONVERSATIONS} needed to hold some out by default; set "
                                   "hyperparameters.val_fraction to hold out a share anyway")
    if len(groups) < 2:
        return conversations, [], "no validation loss: the dataset has one conversation, none can be held out"
    if fraction is None:
        held_out = min(VALIDATION_MAX_HELD_OUT, max(1, round(len(groups) * VALIDATION_SHARE)))
    else:
        held_out = min(len(groups) - 1, max(1, round(len(groups) * fraction)))
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    validation = {i for key in keys[:held_out] for i in groups[key]}
    return ([c for i, c in enumerate(conversations) if i not in validation],
            [c for i, c in enumerate(conversations) if i in validation], None)


def _sequences(examples: list[Example], hp: Hyperparameters, packing: bool) -> list[list[Example]]:
    return pack_examples(examples, hp.max_seq_length) if packing else [[e] for e in examples]


# ---------------------------------------------------------------------------- train

@dataclass
class TrainResult:
    metrics: dict
    model: Any  # the PEFT model, still in memory (tests inspect it; the handler drops it)
    tokenizer: Any

def _chunk_cross_entropy(lm_head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def hidden_states(model, batch, use_mask: bool = True):
    """The decoder's last hidden states for a collated micro-batch (B, L, hidden): packed examples kept apart
    by the 4D mask in attention layers, and by their spans in the layers it does not reach (linear attention,
    run per example: base_models.isolate_packed_examples)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    per_example = {"packed_examples": batch["per_example"]} if getattr(causal_lm, "per_example_layers", 0) else {}
    return causal_lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"] if use_mask else None,
                                position_ids=batch["position_ids"], **per_example).last_hidden_state


def _loss_sum(model, batch, use_mask: bool = True):
    """Sum of the cross-entropy over the trained tokens of one micro-batch.

    The output layer runs only on the positions that predict a trained token, LOSS_CHUNK_TOKENS at a
    time, each chunk recomputed in backward: the full (batch x length x vocabulary) logits, and their
    fp32 copy and gradient, never exist. With Qwen's 152k vocabulary those are the largest activation.
    `use_mask=False` (flash-attention 2) leaves the separation of packed examples to position_ids.
    """
    from torch.utils.checkpoint import checkpoint

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # The positions that predict a trained token (found by `collate` on the CPU: no read-back here).
    hidden = hidden_states(model, batch, use_mask)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["loss_index"])
    targets = batch["loss_targets"]
    lm_head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=hidden.dtype).float()
    for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
        end = start + LOSS_CHUNK_TOKENS
        total = total + checkpoint(_chunk_cross_entropy, lm_head, hidden[start:end], targets[start:end], use_reentrant=False)
    return total


def _trained_in(batch) -> int:
    return batch["trained_tokens"]


def _accumulate(model, batches, n_trained: int, use_mask: bool):
    """Forward and backward over one step's micro-batches; the step's mean loss, still on the device
    (nothing is read back from, or copied to, the GPU here: the CPU can queue every micro-batch)."""
    total = None
    for batch in batches:
        loss = _loss_sum(model, batch, use_mask) / n_trained
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def evaluate(model, sequences, micro_batch_size: int, make_batch, use_mask: bool = True) -> float | None:
    """Mean loss over the trained tokens of `sequences` (batched by `make_batch`, as in training)."""
    import torch

    if not sequences:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(sequences), micro_batch_size):
            batch = make_batch(sequences[i:i + micro_batch_size])
            total += float(_loss_sum(model, batch, use_mask))
            count += _trained_in(batch)
    model.train()
    return total / max(count, 1)


def _gpu_utilization(device: str) -> float | None:
    """Percent of time the GPU was busy over the last sample period (needs NVML); None on CPU."""
    if device != "cuda":
        return None
    import torch

    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - NVML missing or unsupported: report nothing rather than fail
        return None


def _peak_memory_gb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def train(conversations: list[dict], base_model: str | Path, output_dir: str | Path, hp: Hyperparameters,
          on_progress: ProgressFn | None = None, cache_dirs: list[Path] | None = None,
          trust_remote_code: bool = False, checkpoint_dir: str | Path | None = None, fingerprint: str = "",
          quantized_cache: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on canonical conversations and write it to `output_dir`.

    With `checkpoint_dir`, checkpoints are written there every `hp.checkpoint_steps` steps, every
    `hp.checkpoint_minutes` minutes and on SIGTERM, and training resumes from the newest valid one
    whose `fingerprint` (of the settings, data and base model) matches. With `quantized_cache`, the
    4-bit base is kept there for later jobs (see `load_base_model`).
    """
    import bitsandbytes as bnb
    import torch
    from transformers import get_cosine_schedule_with_warmup

    started = time.monotonic()
    progress = on_progress or (lambda _: None)
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)

    # -- setup: data
    base_path = resolve_base_model(str(base_model), cache_dirs or [])
    tokenizer, chat_format = load_tokenizer(base_path, trust_remote_code)
    eot_text = chat_format.end_of_turn
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_convs, val_convs, split_warning = split_validation(conversations, hp.val_fraction, hp.seed)
    data_warnings = [split_warning] if split_warning else []
    train_examples, length_report = label_conversations(tokenizer, train_convs, hp.max_seq_length, eot_text)
    val_examples, _ = label_conversations(tokenizer, val_convs, hp.max_seq_length, eot_text)
    if not train_examples:
        quoted = "; ".join(p["message"] for p in length_report["problems"][:3])
        raise JobError(f"no example could be tokenized for training: {quoted}")
    # -- setup: can packed examples be kept apart in every layer of this architecture?
    packing, packing_note = (*packing_support(load_config(base_path)),) if hp.packing else (False, "off (packing: false)")
    if hp.packing and not packing:
        data_warnings.append(f"packing {packing_note}")
    train_seqs, val_seqs = _sequences(train_examples, hp, packing), _sequences(val_examples, hp, packing)
    # -- setup: does it fit? (config.json only: fail in seconds, before any weight is read)
    device, compute_dtype = select_precision(hp.compute_dtype)
    estimate = check_fits(base_path, hp, Path(str(base_model)).name, trust_remote_code)
    micro, checkpointing = estimate.micro_batch_size, estimate.gradient_checkpointing
    checkpointing_note = "on" if checkpointing else "off"
    accumulation = math.ceil(hp.batch_size / micro)
    steps_per_epoch = math.ceil(len(train_seqs) / hp.batch_size)
    total_steps = steps_per_epoch * hp.epochs
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    warmup = hp.warmup_steps if hp.warmup_steps is not None else math.ceil(hp.warmup_ratio * total_steps)
    log.info("%d examples -> %d sequences of <= %d tokens; %d steps (%d per epoch), batch %d = %d x %d accumulation; "
             "gradient checkpointing %s", len(train_examples), len(train_seqs), hp.max_seq_length, total_steps, steps_per_epoch,
             hp.batch_size, micro, accumulation, checkpointing_note)

    # -- setup: model
    progress({"stage": "loading_model"})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # flex attention where transformers has it for the architecture, and not beside linear-attention layers (their
    # masks cannot be a BlockMask in transformers 5.23)
    architecture = meta_model(load_config(base_path))
    supports_flex = getattr(type(architecture), "_supports_flex_attn", False) and not token_mixers(architecture)
    attention = select_attention(device, micro, packing, supports_flex)
    use_mask = attention != "flash_attention_2"
    # flex attention compiles per row length: packed rows are padded to max_seq_length (they are nearly full anyway)
    pad_to = hp.max_seq_length if attention == "flex_attention" else None

    def make_batch(seqs):
        return collate(seqs, pad_id, device, attention=attention, pad_to=pad_to)

    model, base_weights = load_model(base_path, hp, device, compute_dtype, trust_remote_code, attention, quantized_cache,
                                     checkpointing)
    if packing:  # linear-attention / state-space layers: each packed example on its own
        model.get_base_model().per_example_layers = isolate_packed_examples(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # 8-bit AdamW states. Not the paged variant: LoRA's states are small (~80 MB for a 7B model at
    # rank 16), and bitsandbytes never frees paged buffers, so a warm worker would leak them job by job.
    optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    loaded_at = time.monotonic()

    # -- train (resuming from the newest valid checkpoint of this job, if any)
    history: list[dict] = []
    real_tokens = computed_tokens = trained_tokens = 0
    step, epoch, next_start = 0, 0, 0
    generator = random.Random(hp.seed)
    epoch_state = generator.getstate()
    resumed_from, warnings = None, []
    if checkpoint_dir is not None:
        state, warnings = load_latest_checkpoint(Path(checkpoint_dir), fingerprint)
        if state is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            random.setstate(state["rng_python"])
            torch.set_rng_state(state["rng_torch"])
            rng_cuda = state.get("rng_cuda")  # the GPU this job trains on (older checkpoints: a list, one per GPU)
            if isinstance(rng_cuda, list):
                rng_cuda = rng_cuda[0] if rng_cuda else None
            if device == "cuda" and rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda)
            step, epoch, next_start, epoch_state = state["step"], state["epoch"], state["next_start"], state["epoch_rng"]
            history, (real_tokens, computed_tokens, trained_tokens) = state["history"], state["tokens"]
            resumed_from = step
            if str(state.get("gradient_checkpointing", "")).startswith("on from step") and not checkpointing:
                # "auto" met an out-of-memory step before the checkpoint: recompute from the start this time
                enable_checkpointing(model)
                checkpointing, checkpointing_note = True, state["gradient_checkpointing"]
            if next_start == 0:  # saved at an epoch's end: the shuffle state moves on from that epoch's start
                generator.setstate(epoch_state)
                generator.shuffle(list(range(len(train_seqs))))
            log.info("resumed from the checkpoint of step %d (epoch %d)", step, epoch)

    def checkpoint_state() -> dict:
        from peft import get_peft_model_state_dict

        return {"fingerprint": fingerprint, "step": step, "epoch": epoch, "next_start": next_start, "epoch_rng": epoch_state,
                "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_python": random.getstate(), "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device == "cuda" else None,
                "history": history, "tokens": (real_tokens, computed_tokens, trained_tokens),
                "gradient_checkpointing": checkpointing_note}

    last_checkpoint = time.monotonic()
    resumed_figures = {k: history[-1][k] for k in ("loss", "learning_rate")} if history else {}  # the app's NOT NULLs
    progress({"stage": "training", "percent": 100.0 * step / total_steps, "step": step, "total_steps": total_steps, "epoch": epoch,
              **resumed_figures})
    with stop_on_sigterm() as stop:
        while step < total_steps:
            if next_start == 0:  # a new epoch: remember the shuffle state it starts from
                epoch += 1
                epoch_state = generator.getstate()
            generator.setstate(epoch_state)
            order = list(range(len(train_seqs)))
            generator.shuffle(order)
            for start in range(next_start, len(order), hp.batch_size):
                if step >= total_steps:
                    break
                t0 = time.monotonic()
                step_seqs = [train_seqs[i] for i in order[start:start + hp.batch_size]]
                batches = [make_batch(step_seqs[i:i + micro]) for i in range(0, len(step_seqs), micro)]
                n_trained = sum(_trained_in(b) for b in batches)
                while True:
                    try:
                        loss_total = float(_accumulate(model, batches, n_trained, use_mask))
                        break
                    except torch.OutOfMemoryError:
                        pass  # handled below, once the failed step's activations are freed with its frames
                    optimizer.zero_grad(set_to_none=True)
                    if checkpointing:
                        raise JobError(
                            f"the GPU ran out of memory at step {step + 1} with micro-batch {micro} x up to {hp.max_seq_length} "
                            "tokens; reduce hyperparameters.micro_batch_size (or batch_size), max_seq_length or lora_rank, and "
                            "resubmit" + (" (it resumes from the last checkpoint)" if checkpoint_dir else ""))
                    if hp.gradient_checkpointing is False:
                        raise JobError(
                            f"the GPU ran out of memory at step {step + 1} with gradient_checkpointing false; set it to "
                            '"auto" or true (or reduce micro_batch_size or max_seq_length) and resubmit'
                            + (" (it resumes from the last checkpoint)" if checkpoint_dir else ""))
                    # "auto" chose no recomputation from the estimate, and the GPU disagrees: recompute, and redo the step.
                    log.warning("out of memory at step %d without gradient checkpointing: turning it on and redoing the step", step + 1)
                    enable_checkpointing(model)
                    checkpointing, checkpointing_note = True, f"on from step {step + 1} (out of memory without it)"
                    if device == "cuda":
                        torch.cuda.empty_cache()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm))
                if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):  # before the step spoils the weights
                    raise JobError(f"training diverged at step {step + 1} (loss {loss_total}, gradient norm {grad_norm}): "
                                   f"lower hyperparameters.learning_rate (now {hp.learning_rate:g}) and resubmit")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                next_start = start + hp.batch_size if start + hp.batch_size < len(order) else 0
                step_real = sum(b["real_tokens"] for b in batches)
                real_tokens += step_real
                computed_tokens += sum(b["computed_tokens"] for b in batches)
                trained_tokens += n_trained
                record = {"step": step, "epoch": epoch, "loss": loss_total, "learning_rate": lr, "grad_norm": grad_norm,
                          "tokens_per_second": step_real / max(time.monotonic() - t0, 1e-9), "real_tokens": step_real,
                          "trained_tokens": n_trained,
                          "gpu_utilization": _gpu_utilization(device)}
                if next_start == 0 and val_seqs:
                    record["validation_loss"] = evaluate(model, val_seqs, micro, make_batch, use_mask)
                history.append(record)
                log.info("step %d/%d epoch %d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s", step, total_steps, epoch,
                         loss_total, lr, grad_norm, record["tokens_per_second"])
                progress({"stage": "training", "percent": 100.0 * step / total_steps, "total_steps": total_steps, **record})
                due = (step % hp.checkpoint_steps == 0 or time.monotonic() - last_checkpoint >= 60 * hp.checkpoint_minutes)
                if checkpoint_dir is not None and (stop or (due and step < total_steps)):
                    save_checkpoint(Path(checkpoint_dir), step, checkpoint_state())
                    last_checkpoint = time.monotonic()
                if stop:
                    break
                if next_start == 0:
                    break
            if stop:
                break
    if stop:  # the checkpoint is on disk; stop_on_sigterm hands the signal on
        raise Stopped(f"the worker was asked to stop (SIGTERM) at step {step} of {total_steps}; "
                      + ("a checkpoint was saved: resubmit the same job to resume" if checkpoint_dir else "resubmit the job"))
    train_seconds = time.monotonic() - loaded_at
    # the validation loss of the final weights (measured already if training ended at an epoch's end)
    if history and "validation_loss" in history[-1]:
        validation_loss = history[-1]["validation_loss"]
    else:
        validation_loss = evaluate(model, val_seqs, micro, make_batch, use_mask) if val_seqs else None

    # -- save (the final state is checkpointed first: a failed save is resumed without training again)
    progress({"stage": "saving", "validation_loss": validation_loss})
    if checkpoint_dir is not None and resumed_from != step:
        save_checkpoint(Path(checkpoint_dir), step, checkpoint_state())
    metrics = {
        "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
        "validation_loss": validation_loss, "steps": step, "epochs": epoch,
        "examples": len(train_examples), "validation_examples": len(val_examples),
        "validation_conversations": len({c.get("conversation_id", i) for i, c in enumerate(val_convs)}),
        "sequences": len(train_seqs),
        "tokens": real_tokens, "trained_tokens": trained_tokens,
        "token_efficiency": real_tokens / max(computed_tokens, 1),
        "wall_seconds": time.monotonic() - started, "load_seconds": loaded_at - started, "base_weights": base_weights,
        "train_seconds": train_seconds,
        "tokens_per_second": real_tokens / max(train_seconds, 1e-9),
        "peak_memory_gb": _peak_memory_gb(device), "gradient_checkpointing": checkpointing_note, "device": device, "attention": attention, "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "length_report": length_report, "chat_format": chat_format.describe(), "memory_estimate": estimate.to_dict(),
        "resumed_from_step": resumed_from,
        "packing": packing_note, "warnings": data_warnings + warnings,
    }
    save_dtype = adapter_save_dtype(hp.adapter_dtype, compute_dtype)
    config = {
        "base_model": str(base_model), "base_model_path": str(base_path), "hyperparameters": hp.model_dump(mode="json"),
        "effective": {"lora_alpha": hp.effective_lora_alpha, "micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
                      "warmup_steps": warmup, "total_steps": total_steps, "optimizer": f"bitsandbytes.{optimizer_class.__name__}",
                      "scheduler": "cosine", "quantization": "nf4 + double quantization", "attention": attention,
                      "gradient_checkpointing": checkpointing_note, "chat_format": chat_format.describe(),
                      "kbit_preparation": "frozen base in compute dtype, LoRA fp32; checkpointing non-reentrant where on",
                      "adapter_dtype": str(save_dtype).removeprefix("torch.")},
        "seed": hp.seed, "versions": _library_versions(), "device": device,
    }
    save_adapter(model, tokenizer, eot_text, Path(output_dir), config, metrics, history, save_dtype)
    return TrainResult(metrics, model, tokenizer)


def adapter_save_dtype(setting: str, compute_dtype):
    """The dtype the LoRA weights are saved in. They train in fp32; saved in 16-bit they take half the
    bytes (the app buffers each file in memory to copy it), at a rounding far below what training moves
    them: bf16, or fp16 where the GPU computes in fp16 (no bf16), unless the job asks for another."""
    import torch

    if setting == "auto":
        return torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
    return getattr(torch, setting)


def _library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def save_adapter(model, tokenizer, eot_text: str, output_dir: Path, config: dict, metrics: dict, history: list[dict],
                 dtype=None) -> None:
    """Write everything into a fresh directory beside `output_dir`, then rename it there: never a half-written adapter."""
    from safetensors import SafetensorError

    from files import atomic_dir

    try:
        with atomic_dir(output_dir) as tmp:
            _write_adapter(model, tokenizer, eot_text, tmp, config, metrics, history, dtype)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
        raise JobError(f"could not save the adapter ({getattr(exc, 'strerror', None) or exc}): free space on the volume and resubmit "
                       "the job; it resumes from its final checkpoint without training again") from None


def _write_adapter(model, tokenizer, eot_text: str, tmp: Path, config: dict, metrics: dict, history: list[dict],
                   dtype=None) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig

    model.save_pretrained(tmp)
    if dtype is not None:  # PEFT saves the weights as they train (fp32)
        weights = tmp / "adapter_model.safetensors"
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    portable = stock_loadable_config(adapter_config, model.get_base_model().config.model_type)
    if portable != adapter_config:
        (tmp / "adapter_config.json").write_text(json.dumps(portable, indent=2, sort_keys=True))
        config = {**config, "saved_adapter_config": {
            "target_parameters": portable["target_parameters"], "lora_dropout": 0.0,
            "why": "stock PEFT 0.21 rewrites LoRA targets named like expert projections for this model type; "
                   "as target_parameters they load whole (the LoRA was trained with lora_dropout "
                   f"{adapter_config['lora_dropout']}, which inference does not use)"}}
    # Inference must stop where training taught the model to stop: the end-of-turn token.
    eot_token = end_of_turn_token(tokenizer, eot_text)
    stop_ids = list(dict.fromkeys(i for i in (tokenizer.convert_tokens_to_ids(eot_token), tokenizer.eos_token_id) if i is not None))
    tokenizer.eos_token = eot_token
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    (tmp / "training_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(tmp / "training_log.jsonl", "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")
    plot_losses(history, tmp / "loss_curve.png")


def plot_losses(history: list[dict], path: Path) -> None:
    """Training loss per step and validation loss (where measured), as a PNG for a person to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="training loss", linewidth=1.2)
    validation = [(r["step"], r["validation_loss"]) for r in history if r.get("validation_loss") is not None]
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- preview

def preview(dataset: str, base_model: str, max_seq_length: int = 2048, limit: int | None = None) -> dict:
    """What the trainer would train on: per example, the token counts and the trained text."""
    tokenizer, chat_format = load_tokenizer(Path(base_model))
    eot_text = chat_format.end_of_turn
    conversations, _ = load_dataset(dataset)
    examples = []
    for conversation in conversations[:limit]:
        try:
            ex = tokenize_conversation(tokenizer, conversation, max_seq_length, eot_text)
        except SkipExample as exc:
            examples.append({"skipped": str(exc)})
            continue
        examples.append({"num_tokens": len(ex.input_ids), "num_trained_tokens": ex.num_trained,
                         "trained_text": trained_runs(tokenizer, ex), "truncated": ex.truncated,
                         "dropped_messages": ex.dropped_messages, "_example": ex})
    return {"examples": examples, "template": tokenizer.chat_template, **chat_format.describe(),
            "eos_token": end_of_turn_token(tokenizer, eot_text), "_tokenizer": tokenizer}


def _print_marked(tokenizer, example: Example) -> None:
    """The rendered conversation with each trained run between »» and ««."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    text = "".join(tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)).join(("»»", "««")) if trained
                   else tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) for trained, ids in runs)
    print(text)


# ---------------------------------------------------------------------------- command line

def _add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Hyperparameters field, its default and help taken from the model (the single source)."""
    for name, info in Hyperparameters.model_fields.items():
        if name == "base_model":
            continue
        flag = "--" + name.replace("_", "-")
        annotation = str(info.annotation)
        if "bool" in annotation:  # true/false (and "auto" where the field takes it), checked by the model
            parser.add_argument(flag, default=None, help=f"{info.description} (default {str(info.default).lower()})")
        elif "list" in annotation:
            parser.add_argument(flag, nargs="+", default=None, help=info.description)
        else:
            kind = float if "float" in annotation else int if "int" in annotation else str
            parser.add_argument(flag, type=kind, default=None, help=f"{info.description} (default {info.default})")


def _estimate_command(args) -> int:
    path = Path(args.base_model)
    if not (path / "config.json").is_file() and not path.is_file():
        from job import WorkerSettings

        settings = WorkerSettings.from_env(os.environ)
        path = resolve_base_model(args.base_model, [settings.model_cache_dir, Path("/workspace/models")])
    config = load_config(path)
    setting = parse_hyperparameters({"gradient_checkpointing": args.gradient_checkpointing}).gradient_checkpointing
    # "auto" decides from the GPU's memory; without a figure for it, size the job with recomputation
    checkpointing = True if setting == "auto" and args.gpu_memory_gb is None else setting
    common = dict(max_seq_length=args.max_seq_length, batch_size=args.batch_size, lora_rank=args.lora_rank,
                  gpu_memory_gb=args.gpu_memory_gb, gradient_checkpointing=checkpointing)
    estimate = estimate_job_memory(config, quantize_experts=experts_in_4bit(config), **common)
    result = estimate.to_dict()
    stock = estimate_job_memory(config, quantize_experts=False, **common)
    if stock.weights_gb != estimate.weights_gb:  # MoE experts: what the stock transformers path (16-bit experts) would need
        result["stock_path"] = {k: v for k, v in stock.to_dict().items() if k in ("required_gb", "weights_gb", "fits", "quantized_fraction")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{path}: {estimate.total_parameters / 1e9:.2f}B parameters, {estimate.quantized_fraction:.1%} stored in 4-bit")
    print(f"needs ~{estimate.required_gb:.1f} GB: weights {estimate.weights_gb:.1f}, LoRA+optimizer {estimate.lora_gb:.2f}, "
          f"activations {estimate.activations_gb:.1f}, logits {estimate.logits_gb:.1f}, overhead {estimate.overhead_gb:.1f}")
    if "stock_path" in result:
        print(f"(the stock transformers path keeps the fused experts in 16-bit: ~{stock.required_gb:.0f} GB)")
    if args.gpu_memory_gb is not None:
        print(f"fits {args.gpu_memory_gb:g} GB: {estimate.fits}; micro-batch {estimate.micro_batch_size} x "
              f"{estimate.gradient_accumulation_steps} accumulation steps")
    print(f"gradient checkpointing: {'on' if estimate.gradient_checkpointing else 'off'}" + (
        "" if setting != "auto" else " (auto)" if args.gpu_memory_gb is not None else " (auto: on without --gpu-memory-gb)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train an adapter outside RunPod")
    p_train.add_argument("--dataset", required=True)
    p_train.add_argument("--base-model", required=True)
    p_train.add_argument("--output", required=True)
    p_train.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here, and resume from them")
    _add_hyperparameter_flags(p_train)
    p_prev = sub.add_parser("preview", help="show exactly which tokens would be trained")
    p_prev.add_argument("--dataset", required=True)
    p_prev.add_argument("--base-model", required=True)
    p_prev.add_argument("--max-seq-length", type=int, default=Hyperparameters.model_fields["max_seq_length"].default)
    p_prev.add_argument("--limit", type=int, default=None)
    p_prev.add_argument("--json", action="store_true")
    p_est = sub.add_parser("estimate", help="GPU memory a job needs, from config.json alone")
    p_est.add_argument("--base-model", required=True, help="model directory (config.json is enough) or a cached model id")
    p_est.add_argument("--max-seq-length", type=int, default=Hyperparameters.model_fields["max_seq_length"].default)
    p_est.add_argument("--batch-size", type=int, default=Hyperparameters.model_fields["batch_size"].default)
    p_est.add_argument("--lora-rank", type=int, default=Hyperparameters.model_fields["lora_rank"].default)
    p_est.add_argument("--gpu-memory-gb", type=float, default=None, help="free GPU memory to fit into")
    p_est.add_argument("--gradient-checkpointing", default=Hyperparameters.model_fields["gradient_checkpointing"].default,
                       help="true, false or auto (default: auto, decided from --gpu-memory-gb; on without it)")
    p_est.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "estimate":
            return _estimate_command(args)
        if args.command == "preview":
            result = preview(args.dataset, args.base_model, args.max_seq_length, args.limit)
            tokenizer = result.pop("_tokenizer")
            examples = result["examples"]
            if args.json:
                for e in examples:
                    e.pop("_example", None)
                print(json.dumps(result, ensure_ascii=False))
            else:
                print(f"chat template: {result['template_source']}; end of turn {result['end_of_turn']!r}; "
                      f"system prompt {result['system_prompt']}")
                for i, e in enumerate(examples, 1):
                    print(f"=== example {i}: " + (f"skipped: {e['skipped']}" if "skipped" in e else
                          f"{e['num_tokens']} tokens, {e['num_trained_tokens']} trained, truncated={e['truncated']}"))
                    if "_example" in e:
                        _print_marked(tokenizer, e["_example"])
            return 0
        overrides = {k: v for k, v in vars(args).items() if k in Hyperparameters.model_fields and v is not None}
        hp = parse_hyperparameters(overrides)
        conversations, report = load_dataset(args.dataset)
        fingerprint = json.dumps([hp.model_dump(mode="json"), str(args.dataset), str(args.base_model)], sort_keys=True)
        result = train(conversations, args.base_model, args.output, hp, checkpoint_dir=args.checkpoint_dir,
                       fingerprint=fingerprint)
        print(json.dumps(result.metrics, indent=2))
        return 0
    except (JobError, DatasetError, SkipExample) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
