"""Model loading: the device and precision, the 4-bit base (bitsandbytes NF4, MoE experts per expert),
its 4-bit copy kept for later jobs, the LoRA layers (PEFT) and their targets, and the adapter's files.

`train_lora.py` calls these in its setup and save stages; nothing here trains.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from architecture import per_expert_model_class, per_expert_names
from chat_templates import end_of_turn_token
from files import real_dir
from job import Hyperparameters, JobError

log = logging.getLogger(__name__)


def gpu_facts() -> list[dict]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES), as NVML sees them: `name`, `capability` (major, minor),
    `free_bytes`, `total_bytes`. Read without creating a CUDA context (which would hold ~0.5 GB of GPU 0 for the
    worker's life); [] where there is no GPU or no NVML."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU to describe
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # indices or UUIDs, in the order CUDA numbers them
            by_uuid = {str(pynvml.nvmlDeviceGetUUID(h)): h for h in handles}
            wanted = [v.strip() for v in visible.split(",") if v.strip()]
            handles = [handles[int(v)] if v.isdigit() and int(v) < len(handles) else by_uuid.get(v) for v in wanted]
            handles = handles[:handles.index(None)] if None in handles else handles  # CUDA stops at the first bad one
        facts = []
        for handle in handles:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            facts.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                          "capability": tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                          "free_bytes": int(memory.free), "total_bytes": int(memory.total)})
        return facts
    except Exception:  # noqa: BLE001 - a driver too old for a call: report nothing rather than fail
        return []
    finally:
        pynvml.nvmlShutdown()


def unsupported_gpu() -> str | None:
    """Why the installed torch cannot run on this worker's GPU (it has no kernels for its compute capability), or
    None. A GPU runs kernels built for its own major version and a minor at or below its own, or PTX at or below."""
    import torch

    facts, archs = gpu_facts(), torch.cuda.get_arch_list()
    built = [(m[1], int(m[2]), int(m[3])) for m in (re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", a) for a in archs) if m]
    if not facts or not built:
        return None
    for gpu in facts:
        major, minor = gpu["capability"]
        if not any(kind == "sm" and m == major and n <= minor or kind == "compute" and (m, n) <= (major, minor)
                   for kind, m, n in built):
            sass = sorted((m, n) for kind, m, n in built if kind == "sm")
            return (f"this worker's GPU ({gpu['name']}, compute capability {major}.{minor}) cannot run this image's torch "
                    f"{torch.__version__}, built for compute capability {sass[0][0]}.{sass[0][1]} to "
                    f"{sass[-1][0]}.{sass[-1][1]}: choose other GPU types for the endpoint (V100, T4, A10, A40, A100, L4, "
                    "L40S, H100 and H200 are in that range)")
    return None


def gpu_capability() -> tuple[int, int]:
    """The first visible GPU's compute capability: from NVML, or from torch where NVML cannot say."""
    import torch

    facts = gpu_facts()
    return facts[0]["capability"] if facts else torch.cuda.get_device_capability()


def select_precision(setting: str = "auto"):
    """(device, compute dtype): for "auto", bf16 on GPUs with compute capability >= 8.0, fp16 below, fp32 on the
    CPU; another setting names the dtype (bf16 on the CPU runs the GPU's 16-bit path there, for tests)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting != "auto":
        return device, getattr(torch, setting)
    if device == "cuda":
        major, _ = gpu_capability()
        return "cuda", torch.bfloat16 if major >= 8 else torch.float16
    return "cpu", torch.float32


def free_gpu_memory_gb(device: str) -> float | None:
    """GiB free on this process's GPU, for the fit check (`architecture.check_fits`); None on the CPU (no limit)."""
    if device != "cuda":
        return None
    import gc

    import torch

    if torch.cuda.is_initialized():  # a training process, on its own GPU
        gc.collect()  # a warm worker's previous job may still hold memory (reference cycles, cached blocks)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] / 1024**3
    # the handler, before any download: NVML, no CUDA context taken for the worker's life
    return (gpu_facts() or [{"free_bytes": torch.cuda.mem_get_info()[0]}])[0]["free_bytes"] / 1024**3


FP16_INIT_SCALE = 2.0**16  # the loss scale fp16 training starts from (torch's default); halved after each overflow


def autocast(device: str, compute_dtype):
    """The forward pass (and so the backward) in the compute dtype: the 4-bit layers' matmuls already are, and under
    autocast the LoRA layers' are too (PEFT casts an adapted layer's input to its fp32 weights only without autocast,
    and keeps that fp32 copy for backward: twice the activation memory the estimate counts). Off in fp32."""
    import torch

    return torch.autocast(device_type=device, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


def loss_scaler(device: str, compute_dtype):
    """Dynamic loss scaling for fp16 (GPUs without bf16, or `compute_dtype: float16`): the loss is divided by the
    batch's trained tokens, and its gradients would underflow fp16 and vanish without it. A step whose gradients
    overflow is skipped and the scale halved; it doubles again after 2,000 clean steps. A no-op otherwise."""
    import torch

    return torch.amp.GradScaler(device, init_scale=FP16_INIT_SCALE, enabled=compute_dtype == torch.float16)


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


ROUTED_EXPERTS = r".*\.experts\.\d+\..*"  # module names of per-expert layers (see architecture.PerExpertMoE)


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
    import bitsandbytes as bnb

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
    import torch

    model_class = causal_lm_class(base_model, trust_remote_code)
    common = dict(dtype=compute_dtype, attn_implementation=attention, device_map={"": torch.cuda.current_device()} if device == "cuda" else None,
                  trust_remote_code=trust_remote_code)
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
        if (copy / "config.json").is_file():  # another worker's, written meanwhile, or one that would not load (a
            log.info("a 4-bit copy is already at %s; not writing another", copy)  # later single-process job replaces it)
            return
        _keep_quantized_copy(model.unload(), copy)
    except Exception as exc:  # noqa: BLE001 - the adapter is saved: a copy that cannot be written costs later jobs only
        log.warning("could not keep a 4-bit copy of the base model (%s: %s); later jobs quantize it again",
                    type(exc).__name__, exc)


def free_memory(device: str) -> None:
    """Give back what a dropped model held: `del` alone does not (bitsandbytes' 4-bit weights point back at their
    layers: a reference cycle only a garbage collection breaks), nor does it return the cached blocks to the GPU."""
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def enable_recomputation(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: the frozen inputs need
    no gradient trick, and dropout's random state is replayed)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def load_model(base_model: Path, hp: Hyperparameters, device: str, compute_dtype, trust_remote_code: bool = False,
               attention: str = "sdpa", quantized_cache: Path | None = None, recompute: bool = True,
               keep_copy: bool = True):
    """The base model in 4-bit (MoE experts too) with trainable LoRA layers on top; and where the
    4-bit weights came from.

    k-bit preparation is done here rather than with PEFT's `prepare_model_for_kbit_training`, which
    casts every non-4-bit weight (embeddings, lm_head, norms) to fp32: 4.4 GB more for Qwen2.5-7B's
    embeddings alone. The frozen weights stay in the compute dtype; LoRA weights are fp32.
    """
    import torch
    from peft import get_peft_model

    model, source = load_base_model(base_model, device, compute_dtype, trust_remote_code, attention, quantized_cache, keep_copy)
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

def adapter_save_dtype(setting: str, compute_dtype):
    """The dtype the LoRA weights are saved in. They train in fp32; saved in 16-bit they take half the
    bytes (the app buffers each file in memory to copy it), at a rounding far below what training moves
    them: bf16, or fp16 where the GPU computes in fp16 (no bf16), unless the job asks for another."""
    import torch

    if setting == "auto":
        return torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
    return getattr(torch, setting)


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def write_adapter(model, tokenizer, eot_text: str, tmp: Path, config: dict, metrics: dict, training_log: Path,
                  dtype=None) -> None:
    """The adapter's files in `tmp`: LoRA weights (in `dtype`), a config stock PEFT loads whole, the tokenizer and a
    generation config that stop at the end-of-turn token, the training config, metrics, the per-step log (a copy of
    `training_log`) and its loss chart."""
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
    shutil.copyfile(training_log, tmp / "training_log.jsonl")
    plot_losses(tmp / "training_log.jsonl", tmp / "loss_curve.png")


def plot_losses(training_log: Path, path: Path) -> None:
    """Training loss per step and validation loss (where measured), as a PNG for a person to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, validation = [], [], []
    with open(training_log) as f:
        for record in map(json.loads, f):
            steps.append(record["step"])
            losses.append(record["loss"])
            if record.get("validation_loss") is not None:
                validation.append((record["step"], record["validation_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="training loss", linewidth=1.2)
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gpu_utilization(device: str) -> float | None:
    """Percent of time the GPU was busy over the last sample period (needs NVML); None on CPU."""
    if device != "cuda":
        return None
    import torch

    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - NVML missing or unsupported: report nothing rather than fail
        return None


def peak_memory_gb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
