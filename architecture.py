"""Facts about a base model's architecture, read from its `config.json` alone: the parameters of each kind, the
memory a job needs and whether it fits the GPU, the MoE experts the worker loads in 4-bit, and the layers that
keep packed examples apart.

The memory estimate builds transformers' architecture for the config on the meta device, counts the parameters
of each kind and which of them bitsandbytes really stores in 4-bit, and adds the LoRA, optimizer and activation
memory of the job. No weight is read, so a model that cannot fit fails in seconds.

The handler imports this module at its start, before any job: torch and transformers are imported inside the
functions that need them, so that the worker starts without them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from compat import conversion_patterns
from job import Hyperparameters, JobError, parse_hyperparameters

GB = 1024**3
NF4_BYTES = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # = 0.5161 bytes per weight
CUDA_OVERHEAD_GB = 1.0  # CUDA context, cuBLAS workspaces, allocator slack
LOSS_CHUNK_TOKENS = 1024  # the trainer's output layer runs on at most this many positions at a time
# `gradient_checkpointing: "auto"` skips recomputation only when the job, without it, fits in this
# share of the free memory (the estimate is not yet checked against a GPU; the trainer also turns
# checkpointing on if a step runs out of memory without it).
AUTO_CHECKPOINTING_SHARE = 0.9




# ---------------------------------------------------------------------------- counting parameters

def load_config(model: str | Path) -> dict:
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise JobError(f"no config.json at {path}: pass a model directory (a directory holding only config.json "
                       "is enough)")
    config = json.loads(config_file.read_text())
    return config.get("text_config", config)  # multimodal wrappers keep the decoder's settings here


def meta_model(c: dict):
    """transformers' own architecture for config `c`, on the meta device: no memory, no weights."""
    return _meta_model(json.dumps(c, sort_keys=True))


@functools.lru_cache(maxsize=4)  # the fit check and the packing check both look at it
def _meta_model(config_json: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    c = json.loads(config_json)
    try:
        config = AutoConfig.for_model(**c)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (KeyError, ValueError) as exc:
        raise JobError(f"cannot size model type {c.get('model_type')!r} from its config.json ({exc}); "
                       "the estimate needs an architecture this transformers knows") from None


def count_parameters(c: dict, *, quantize_experts: bool = True) -> dict:
    """Parameters by kind, counted on transformers' own architecture for config `c`, built on the
    meta device (no memory, no weights), so that any architecture transformers knows is counted
    exactly (DeepSeek's `n_routed_experts`, MLA attention, ...).

    `quantized` counts what is stored in 4-bit: the decoder's nn.Linear layers (bitsandbytes replaces
    them; not the output layer) and, when `quantize_experts`, the MoE experts, which the stock
    transformers 5 path fuses into 3D tensors and leaves in 16-bit (see `per_expert_model_class`).
    Embeddings, lm_head, biases, norms, routers and convolutions stay in 16-bit.
    """
    import torch

    model = meta_model(c)
    output = model.get_output_embeddings()
    linear = 0
    lora_shapes: list[tuple[int, int]] = []  # (in, out) of each linear layer LoRA can target
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            linear += module.weight.numel()
            if ".experts." not in name:
                lora_shapes.append((module.in_features, module.out_features))
    experts = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 3 and ".experts." in name)
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    h = c["hidden_size"]
    return {"total": total, "quantized": linear + (experts if quantize_experts else 0), "linear": linear,
            "experts": experts, "other": total - linear - experts, "lora_shapes": lora_shapes,
            "embeddings": c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2), "vocab": c["vocab_size"],
            "hidden": h, "layers": c["num_hidden_layers"], "heads": c["num_attention_heads"],
            "mlp_values_per_token": _mlp_values_per_token(c)}


TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _mlp_values_per_token(c: dict) -> int:
    """Values one token leaves in an MLP block for backward: 4 per intermediate unit for a gated MLP
    (gate, up, activation, product); a routed MoE keeps, per chosen expert, its gate, up and
    activation outputs and the expert's output (weighted by the router), plus its shared experts.
    Configs name these differently; a model with neither layout counts as a 4 x hidden MLP."""
    h = c["hidden_size"]
    dense = c.get("intermediate_size") or c.get("ffn_dim") or 4 * h
    top_k = next((c[k] for k in TOP_K_KEYS if isinstance(c.get(k), int) and c[k] > 0), 0)
    if not top_k or not any(c.get(k) for k in EXPERT_COUNT_KEYS):
        return 4 * dense
    expert = c.get("moe_intermediate_size") or dense
    shared = c.get("shared_expert_intermediate_size") or (c.get("n_shared_experts") or 0) * expert
    return top_k * (3 * expert + h) + 4 * shared


# ---------------------------------------------------------------------------- memory of a job

@dataclass
class MemoryEstimate:
    required_gb: float
    weights_gb: float
    lora_gb: float
    activations_gb: float
    logits_gb: float
    overhead_gb: float
    fits: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    quantized_fraction: float
    total_parameters: int
    gpu_memory_gb: float | None

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _job_memory_gb(p: dict, micro: int, seq: int, lora_rank: int, checkpointing: bool, compute_bytes: int) -> dict:
    weights = (p["quantized"] * NF4_BYTES + (p["total"] - p["quantized"]) * compute_bytes) / GB
    lora_params = sum(lora_rank * (a + b) for a, b in p["lora_shapes"])
    lora = lora_params * (4 + 4 + 2) / GB  # fp32 weights + fp32 grads + two 8-bit Adam states
    tokens = micro * seq
    h = p["hidden"]
    # One decoder layer's live activations during its backward (recomputed under checkpointing):
    # ~34·h values per token around attention (Korthikanti et al. 2022) plus the MLP's, in 16-bit,
    # plus the seq x seq attention scores of an sdpa call with an explicit (packing) mask.
    per_layer = (tokens * (34 * h + p["mlp_values_per_token"]) * compute_bytes
                 + micro * p["heads"] * seq * seq * compute_bytes)
    stored = tokens * h * compute_bytes * p["layers"] if checkpointing else per_layer * p["layers"]
    activations = (stored + per_layer) / GB
    # Logits of one loss chunk at a time (trained positions only): 16-bit, the fp32 copy, its gradient.
    logits = min(tokens, LOSS_CHUNK_TOKENS) * p["vocab"] * (compute_bytes + 4 + 4) / GB
    return {"weights": weights, "lora": lora, "activations": activations, "logits": logits}


def _default(name: str):
    """A hyperparameter's default, from job.Hyperparameters (the single source)."""
    return Hyperparameters.model_fields[name].default


def estimate_job_memory(config: dict, *, max_seq_length: int = _default("max_seq_length"),
                        batch_size: int = _default("batch_size"), lora_rank: int = _default("lora_rank"),
                        gpu_memory_gb: float | None = None, gradient_checkpointing: bool | str = True,
                        compute_bytes: int = 2, quantize_experts: bool = True,
                        micro_batch_size: int | None = None) -> MemoryEstimate:
    """Memory of a QLoRA job on one GPU from config.json alone; `batch_size` is the sequences that GPU
    computes per optimizer step. With `gpu_memory_gb`, the largest micro-batch (up to `micro_batch_size`,
    or the batch) that fits is chosen, and gradient accumulation keeps the batch.

    `gradient_checkpointing="auto"` decides it from memory: off (no recomputation, about a third
    less compute per step) when the whole micro-batch fits without it in `AUTO_CHECKPOINTING_SHARE`
    of `gpu_memory_gb`, or when no limit is given; on otherwise. A smaller micro-batch is never
    traded for it: the micro-batch is the job's, and it keeps the GPU busy."""
    p = count_parameters(config, quantize_experts=quantize_experts)
    micro = min(micro_batch_size or batch_size, batch_size)
    if gradient_checkpointing == "auto":
        without = (sum(_job_memory_gb(p, micro, max_seq_length, lora_rank, False, compute_bytes).values())
                   + CUDA_OVERHEAD_GB)
        gradient_checkpointing = gpu_memory_gb is not None and without > AUTO_CHECKPOINTING_SHARE * gpu_memory_gb
    while True:
        parts = _job_memory_gb(p, micro, max_seq_length, lora_rank, gradient_checkpointing, compute_bytes)
        required = sum(parts.values()) + CUDA_OVERHEAD_GB
        if gpu_memory_gb is None or required <= gpu_memory_gb or micro == 1:
            break
        micro = max(1, micro // 2)
    fits = gpu_memory_gb is None or required <= gpu_memory_gb
    return MemoryEstimate(
        required_gb=required, weights_gb=parts["weights"], lora_gb=parts["lora"], activations_gb=parts["activations"],
        logits_gb=parts["logits"], overhead_gb=CUDA_OVERHEAD_GB, fits=fits, micro_batch_size=micro,
        gradient_accumulation_steps=math.ceil(batch_size / micro), gradient_checkpointing=bool(gradient_checkpointing),
        quantized_fraction=p["quantized"] / p["total"],
        total_parameters=p["total"], gpu_memory_gb=gpu_memory_gb,
    )


def check_fits(base_path: Path, hp: Hyperparameters, name: str, *, compute_dtype, free_gb: float | None,
               trust_remote_code: bool = False, world_size: int = 1) -> MemoryEstimate:
    """The estimate for one GPU's share of the job (its sequences per step, `micro_batch_size` at most) from
    `config.json` alone, for `free_gb` GiB free on that GPU (None: the CPU, no limit) and `compute_dtype` (a torch
    dtype); the caller reads both (`model_loading.select_precision`, `model_loading.free_gpu_memory_gb`). JobError
    naming what to change when even micro-batch 1 cannot fit."""
    config = load_config(base_path)
    estimate = estimate_job_memory(
        config, max_seq_length=hp.max_seq_length, batch_size=math.ceil(hp.batch_size / world_size),
        micro_batch_size=hp.micro_batch_size, lora_rank=hp.lora_rank, gpu_memory_gb=free_gb,
        gradient_checkpointing=hp.gradient_checkpointing,  # "auto": decided from memory
        quantize_experts=experts_in_4bit(config) and not trust_remote_code, compute_bytes=compute_dtype.itemsize)
    if not estimate.fits:
        raise JobError(does_not_fit_message(name, estimate, hp.max_seq_length))
    return estimate


def does_not_fit_message(name: str, estimate: MemoryEstimate, max_seq_length: int) -> str:
    return (f"{name} needs ~{estimate.required_gb:.0f} GB with this setup (weights {estimate.weights_gb:.0f} GB "
            f"in 4-bit, activations and logits {estimate.activations_gb + estimate.logits_gb:.1f} GB at "
            f"micro-batch 1 x {max_seq_length} tokens), the GPU has {estimate.gpu_memory_gb:.0f} GB free. Use a GPU "
            "with more memory, a smaller model, or a shorter max_seq_length")


# ---------------------------------------------------------------------------- MoE experts in 4-bit

def expert_projection_names(model_type: str) -> tuple[str, str, str] | None:
    """How checkpoints of `model_type` name each routed expert's gate, up and down projections
    (`mlp.experts.<e>.gate_proj.weight`, ...), read from transformers' own conversion mapping, which
    fuses them into 3D tensors on load; None when the model has no such experts or they are stored
    another way (renamed or already fused on disk)."""
    names: dict[str, list[str]] = {}
    for sources, targets in conversion_patterns(model_type) or []:
        leaves = [re.fullmatch(r"mlp\.experts\.\*\.(\w+)\.weight", s) for s in sources]
        if all(leaves) and targets in (["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]):
            names[targets[0]] = [m.group(1) for m in leaves]
    gate_up, down = names.get("mlp.experts.gate_up_proj", []), names.get("mlp.experts.down_proj", [])
    return (gate_up[0], gate_up[1], down[0]) if len(gate_up) == 2 and len(down) == 1 else None


# Model types whose fused experts `PerExpertMoE` reproduces exactly (tested: tests/test_architecture.py).
# Others that transformers fuses the same way differ inside (e.g. LongCat's identity "zero experts",
# DeepSeek's grouped routing): they stay on the stock path, experts in 16-bit, and are estimated so.
PER_EXPERT_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "qwen3_next")


def per_expert_names(model_type: str) -> tuple[str, str, str] | None:
    """The expert projection names when the worker loads `model_type`'s experts per expert in 4-bit."""
    return expert_projection_names(model_type) if model_type in PER_EXPERT_MODEL_TYPES else None


def experts_in_4bit(config: dict) -> bool:
    """Whether the worker loads this model's routed experts in 4-bit (see `per_expert_model_class`)."""
    return per_expert_names(config.get("model_type", "")) is not None


def _per_expert_module_class():
    import torch
    from torch import nn

    class PerExpertMoE(nn.Module):
        """Routed experts as one gate/up/down nn.Linear each, named as checkpoints store them
        (`mlp.experts.<e>.gate_proj.weight`). transformers 5 fuses them into 3D parameters, which
        bitsandbytes does not quantize (77B of Qwen3-Next-80B's 80B); as nn.Linear they are loaded one
        tensor at a time and quantized as they arrive, like every other linear layer. Same routing and
        maths as the fused module (gate and up are the two halves of its `gate_up_proj`)."""

        def __init__(self, fused, names: tuple[str, str, str]):
            super().__init__()
            num_experts, two_inter, hidden = fused.gate_up_proj.shape
            self.num_experts, self.names, self.act_fn = num_experts, names, fused.act_fn
            for e in range(num_experts):  # children "0", "1", ...: the checkpoint's key names
                expert = nn.Module()
                for name, (n_in, n_out) in zip(names, [(hidden, two_inter // 2)] * 2 + [(two_inter // 2, hidden)]):
                    setattr(expert, name, nn.Linear(n_in, n_out, bias=False, device=fused.gate_up_proj.device,
                                                    dtype=fused.gate_up_proj.dtype))
                self.add_module(str(e), expert)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            gate_name, up_name, down_name = self.names
            final = torch.zeros_like(hidden_states)
            for e in torch.unique(top_k_index).tolist():
                if e >= self.num_experts:
                    continue
                token_idx, slot = torch.where(top_k_index == e)
                x, expert = hidden_states[token_idx], self.get_submodule(str(e))
                out = getattr(expert, down_name)(
                    self.act_fn(getattr(expert, gate_name)(x)) * getattr(expert, up_name)(x))
                final.index_add_(0, token_idx, (out * top_k_weights[token_idx, slot, None]).to(final.dtype))
            return final

    return PerExpertMoE


def per_expert_model_class(model_class, names: tuple[str, str, str]):
    """`model_class`, built with `PerExpertMoE` in place of every fused-experts module.

    from_pretrained then finds each checkpoint key (`...mlp.experts.7.up_proj.weight`) in the model
    as it is, loads it without fusing and quantizes it on arrival: the GPU never holds the experts in
    16-bit, which is what lets Qwen3-Next-80B load on one 80 GB GPU (~42 GB in 4-bit instead of ~151 GB).
    """
    import torch
    from transformers import PreTrainedModel

    per_expert = _per_expert_module_class()

    class PerExpertModel(model_class):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            # transformers looks its checkpoint conversions (here: fusing the experts) up for each
            # PreTrainedModel inside, and skips them for custom code: this class is custom, and its
            # inner model is marked so too, so every key, 4-bit quantization state included, loads as named.
            for module in self.modules():
                if module is not self and isinstance(module, PreTrainedModel):
                    module.__class__ = type(type(module).__name__, (type(module),), {"__module__": __name__})
            for name, module in list(self.named_modules()):
                fused = getattr(module, "gate_up_proj", None)
                if isinstance(fused, torch.nn.Parameter) and fused.dim() == 3 and hasattr(module, "down_proj"):
                    parent, _, child = name.rpartition(".")
                    setattr(self.get_submodule(parent), child, per_expert(module, names))

    PerExpertModel.__name__ = PerExpertModel.__qualname__ = model_class.__name__
    return PerExpertModel


# ---------------------------------------------------------------------------- packed examples, kept apart

# Layers that mix tokens with a causal convolution or a recurrent scan from a zero state (linear attention,
# state-space models). The 4D block-diagonal mask that keeps packed examples apart in attention layers never
# reaches them (transformers passes them a 2D padding mask or none), so their conv and state run across the
# whole packed row. These classes are run per example instead (`isolate_packed_examples`): their forward takes
# (hidden_states, ..., attention_mask, **kwargs), their decoder layer hands them the model's **kwargs, and every
# other op in them is per token, so one call per example is exactly that example alone (packed == alone on a tiny
# random model of each type: tests/test_packing.py).
ISOLATED_TOKEN_MIXERS = {
    "Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "OlmoHybridGatedDeltaNet",
    "KimiLinearDeltaAttention", "Lfm2ShortConv", "Lfm2MoeShortConv", "FalconH1Mixer", "GraniteMoeHybridMambaLayer",
    "BambaMixer", "NemotronHMamba2Mixer", "Zamba2MambaMixer",
}
# How other such layers are recognised (Jamba's and Mamba's mixers are called without **kwargs, MiniMax's lightning
# attention and RecurrentGemma's block with other arguments, RWKV and xLSTM are recurrent throughout): their jobs
# train unpacked.
TOKEN_MIXER_NAMES = ("Mamba", "Mixer", "ShortConv", "DeltaNet", "DeltaAttention", "LinearAttention", "Lightning",
                     "RecurrentBlock", "Rwkv", "xLSTM", "Mlstm", "Slstm")
NOT_TOKEN_MIXERS = {"KimiLinearAttention"}  # Kimi Linear's full (MLA) attention, named after the model: takes the mask


def token_mixers(model) -> set[str]:
    """Class names of the layers of `model` that mix tokens without the attention mask: named like linear attention
    or state-space layers, or holding a 1D convolution (a causal conv over the sequence, as ZAYA's attention has)."""
    import torch

    found = set()
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("DecoderLayer") or name in NOT_TOKEN_MIXERS:
            continue
        if any(k in name for k in TOKEN_MIXER_NAMES) or any(isinstance(c, torch.nn.Conv1d) for c in module.children()):
            found.add(name)
    return found


def packing_support(config: dict) -> tuple[bool, str]:
    """Whether packed examples can be kept apart in every layer of this architecture, and how (for metrics)."""
    mixers = token_mixers(meta_model(config))
    others = sorted(mixers - ISOLATED_TOKEN_MIXERS)
    if others:
        return False, (f"off: {config.get('model_type')} has layers ({', '.join(others)}) whose convolution or "
                       "recurrent state would run across packed examples and cannot be run per example: one "
                       "conversation per sequence")
    how = "on: a block-diagonal attention mask" + (f"; {', '.join(sorted(mixers))} run per example" if mixers else "")
    return True, how


def _per_example_forward(original, hidden_states, *args, packed_examples=None, **kwargs):
    """The layer's own forward, run on each packed example on its own (its conv and scan start from zero): the
    examples as the rows of a batch, right-padded with zeros (a causal conv and a causal scan never read what comes
    after), in the groups `chat_labels.per_example_groups` made; each output token goes back to its place. Calls
    without groups (no row packed; generation) run as they are."""
    import torch

    if packed_examples is None:
        return original(hidden_states, *args, **kwargs)
    if args or kwargs.get("cache_params") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("packed examples cannot run with a generation cache or positional arguments: use_cache=False")
    if any(kwargs.get(k) is not None for k in ("attention_mask", "conv_mask")):
        raise ValueError("a linear-attention layer got a padding mask beside packed examples; the 4D mask turns it off")
    batch, length, width = hidden_states.shape
    flat = torch.cat([hidden_states.reshape(batch * length, width), hidden_states.new_zeros(1, width)])
    out = flat.new_empty(batch * length, width)
    for gather, source, destination in packed_examples:
        y = original(flat[gather], **kwargs)
        out = out.index_copy(0, destination, y.reshape(-1, width).index_select(0, source))
    return out.reshape(batch, length, width)


def isolate_packed_examples(model) -> int:
    """Run each linear-attention / state-space layer of `model` per packed example when the model's forward is
    given `packed_examples=` (`collate`'s "per_example", which the trainer passes down; transformers hands the
    model's extra keyword arguments on to these layers, also when gradient checkpointing recomputes them).
    Returns how many layers were wrapped (0: the model has none)."""
    wrapped = 0
    for module in model.modules():
        if type(module).__name__ in ISOLATED_TOKEN_MIXERS and not getattr(module, "_per_example", False):
            module.forward = functools.partial(_per_example_forward, module.forward)
            module._per_example = True
            wrapped += 1
    return wrapped


def estimate_command(args, path: Path) -> int:
    """`train_lora.py estimate`: the memory a job on the model at `path` (`model_hub.config_source`) needs, printed
    (or as JSON)."""
    config = load_config(path)
    setting = parse_hyperparameters({"gradient_checkpointing": args.gradient_checkpointing}).gradient_checkpointing
    # "auto" decides from the GPU's memory; without a figure for it, size the job with recomputation
    checkpointing = True if setting == "auto" and args.gpu_memory_gb is None else setting
    common = dict(max_seq_length=args.max_seq_length, batch_size=args.batch_size, lora_rank=args.lora_rank,
                  gpu_memory_gb=args.gpu_memory_gb, gradient_checkpointing=checkpointing)
    estimate = estimate_job_memory(config, quantize_experts=experts_in_4bit(config), **common)
    result = estimate.to_dict()
    stock = estimate_job_memory(config, quantize_experts=False, **common)
    # MoE experts: what the stock transformers path (16-bit experts) would need
    if stock.weights_gb != estimate.weights_gb:
        result["stock_path"] = {k: v for k, v in stock.to_dict().items()
                                if k in ("required_gb", "weights_gb", "fits", "quantized_fraction")}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{path}: {estimate.total_parameters / 1e9:.2f}B parameters, "
          f"{estimate.quantized_fraction:.1%} stored in 4-bit")
    print(f"needs ~{estimate.required_gb:.1f} GB: weights {estimate.weights_gb:.1f}, "
          f"LoRA+optimizer {estimate.lora_gb:.2f}, activations {estimate.activations_gb:.1f}, "
          f"logits {estimate.logits_gb:.1f}, overhead {estimate.overhead_gb:.1f}")
    if "stock_path" in result:
        print(f"(the stock transformers path keeps the fused experts in 16-bit: ~{stock.required_gb:.0f} GB)")
    if args.gpu_memory_gb is not None:
        print(f"fits {args.gpu_memory_gb:g} GB: {estimate.fits}; micro-batch {estimate.micro_batch_size} x "
              f"{estimate.gradient_accumulation_steps} accumulation steps")
    print(f"gradient checkpointing: {'on' if estimate.gradient_checkpointing else 'off'}" + (
        "" if setting != "auto" else " (auto)" if args.gpu_memory_gb is not None
        else " (auto: on without --gpu-memory-gb)"))
    return 0

