"""Packed examples never see each other, in any layer type: per-token losses of examples packed into rows equal
those of each example alone, for each architecture family the worker trains (tiny random models built from their
transformers configs), through the worker's own forward (`loss.hidden_states`); the LoRA gradients too, and
the 16-bit path."""

import importlib.util
import math
import shutil

import pytest
import torch
import transformers

from architecture import ISOLATED_TOKEN_MIXERS, isolate_packed_examples, meta_model, packing_support, token_mixers
from chat_labels import IGNORE, Example, collate
from compat import supports_flex_attention
from conftest import SAMPLE
from dataset_loader import load_dataset
from device import select_attention
from job import Hyperparameters
from loss import hidden_states, loss_sum
from model_loading import load_model
from tiny_model import build_tiny_model
from train_lora import train

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

V = 256
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
LINEAR = dict(linear_num_key_heads=2, linear_key_head_dim=32, linear_num_value_heads=4, linear_value_head_dim=16)
HYBRID = ["linear_attention"] * 3 + ["full_attention"]
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# model_type -> config overrides. Attention-only families, then those with linear-attention or state-space layers.
FAMILIES = {
    "qwen2": {}, "mistral": {}, "llama": {}, "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=16, **MOE),  # a dense-attention MoE
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_next": dict(num_hidden_layers=4, head_dim=16, full_attention_interval=4, **LINEAR, **MOE,
                       shared_expert_intermediate_size=32),
    "qwen3_5_text": dict(num_hidden_layers=4, head_dim=16, layer_types=HYBRID, **LINEAR),
    "qwen3_5_moe_text": dict(num_hidden_layers=4, head_dim=16, layer_types=HYBRID, **LINEAR, **MOE,
                             shared_expert_intermediate_size=32),
    "olmo_hybrid": dict(num_hidden_layers=4, layer_types=HYBRID, linear_num_key_heads=2, linear_num_value_heads=2,
                        linear_key_head_dim=16, linear_value_head_dim=32),
    "kimi_linear": dict(num_hidden_layers=4, layer_types=HYBRID, mlp_layer_types=["dense"] * 4, linear_num_heads=2,
                        linear_head_dim=16, num_key_value_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, kv_lora_rank=16, q_lora_rank=None, head_dim=8, num_experts=4,
                        moe_intermediate_size=32),
    "lfm2": dict(num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"], full_attn_idxs=[2],
                 block_auto_adjust_ff_dim=False),
    "lfm2_moe": dict(num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"],
                     num_dense_layers=1, **MOE),
    "falcon_h1": dict(num_hidden_layers=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=32, head_dim=16),
    "granitemoehybrid": dict(num_hidden_layers=4, layer_types=["mamba", "mamba", "attention", "mamba"],
                             num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
                             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=32),
    "bamba": dict(num_hidden_layers=4, attn_layer_indices=[2], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                  mamba_chunk_size=32),
    "nemotron_h": dict(layers_block_type=["mamba", "mlp", "attention", "mamba"], head_dim=16, ssm_state_size=16,
                       mamba_num_heads=8, mamba_head_dim=16, chunk_size=32, n_groups=1, use_mamba_kernels=False),
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "mamba"], hybrid_layer_ids=[1],
                   mamba_d_state=16, n_mamba_heads=4, mamba_headdim=32, chunk_size=32, attention_head_dim=32,
                   attention_hidden_size=128, use_mamba_kernels=False),
}
ROWS = [[40, 25, 70], [50, 30]]  # two micro-batch rows of packed examples (the second padded at its end)


def tiny(model_type: str, dtype=torch.float32, attention: str = "sdpa"):
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(dtype).eval()
    with torch.no_grad():  # widen the random weights: a leak between examples then moves the losses visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    model.config.use_cache = False
    return model


def examples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[Example(ids := torch.randint(3, V, (n,), generator=g).tolist(), [IGNORE] + ids[1:]) for n in row]
            for row in ROWS]


def token_losses(model, rows, attention: str = "sdpa", per_example: bool = False) -> list[torch.Tensor]:
    """Per-token losses of every example, read off the packed rows, and of each example alone (the worker's forward;
    `per_example`: the model's linear-attention layers run each example on its own)."""
    def losses(batch, row, start, example):
        hidden = hidden_states(model, batch, per_example=per_example)[row, start:start + len(example.input_ids)]
        logits = model.get_output_embeddings()(hidden).float()
        return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(example.input_ids[1:]), reduction="none")

    packed, alone, batch = [], [], collate(rows, 0, attention=attention, pad_to=160)
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            packed.append(losses(batch, r, start, example))
            alone.append(losses(collate([[example]], 0, attention=attention), 0, 0, example))
            start += len(example.input_ids)
    return [(p - a).abs().max() for p, a in zip(packed, alone)]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_examples_compute_what_each_computes_alone(model_type):
    model, rows = tiny(model_type), examples()
    mixers = {type(m).__name__ for m in model.modules()} & ISOLATED_TOKEN_MIXERS
    assert bool(mixers) == (model_type not in ("qwen2", "mistral", "llama", "qwen3", "qwen3_moe", "mixtral"))
    supported, note = packing_support(model.config.to_dict())
    assert supported and note.startswith("on: a block-diagonal attention mask")
    per_example = False
    if mixers:  # without the per-example path the conv and the recurrent state run across examples: the test sees it
        with torch.no_grad():
            assert max(token_losses(model, rows)) > 1e-3
        per_example = isolate_packed_examples(model) > 0
        assert per_example and ", ".join(sorted(mixers)) in note
    with torch.no_grad():
        worst = max(token_losses(model, rows, per_example=per_example))
    assert worst <= 1e-5, f"{model_type}: packed and alone differ by {worst:.1e}"


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "qwen3_moe"])
def test_flex_attention_with_a_document_mask_keeps_packed_examples_apart(model_type):
    """The GPU's fast path (collate's BlockMask, rows padded to a fixed length), in forward: flex attention runs
    forward on the CPU, backward only on a GPU, so its training speed is the GPU benchmark's."""
    supports = supports_flex_attention(type(meta_model(tiny(model_type).config.to_dict())))
    triton_can_compile = bool(importlib.util.find_spec("triton") and (shutil.which("cc") or shutil.which("gcc")))
    assert supports and select_attention("cuda", 4, True, supports) == (
        "flex_attention" if triton_can_compile else "sdpa")
    assert (select_attention("cpu", 4, True, supports) == "sdpa"
            and select_attention("cuda", 4, False, supports) == "sdpa")
    model = tiny(model_type, attention="flex_attention")
    per_example = isolate_packed_examples(model) > 0
    batch = collate(examples(), 0, attention="flex_attention", pad_to=160)
    assert type(batch["attention_mask"]).__name__ == "BlockMask" and batch["input_ids"].shape == (2, 160)
    with torch.no_grad():
        worst = max(token_losses(model, examples(), attention="flex_attention", per_example=per_example))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("model_type", [t for t in FAMILIES
                                        if t not in ("qwen2", "mistral", "llama", "qwen3", "qwen3_moe", "mixtral")])
def test_models_with_linear_attention_layers_keep_the_dense_mask_on_a_gpu(model_type):
    """transformers 5.23 has no flex attention for Qwen3-Next, and the hybrids that have it (LFM2, Granite-4.0-H,
    Nemotron-H, Zamba2) cannot take a BlockMask beside their linear layers: the worker keeps sdpa's dense mask."""
    architecture = meta_model(tiny(model_type).config.to_dict())
    mixers = token_mixers(architecture)
    assert mixers and mixers <= ISOLATED_TOKEN_MIXERS
    supports = supports_flex_attention(type(architecture)) and not mixers
    assert select_attention("cuda", 4, True, supports) == "sdpa"


def test_the_lora_gradients_of_packed_examples_equal_those_of_each_alone(tmp_path):
    """Qwen3-Next in the worker's own setup: 4-bit base, LoRA on every linear layer, gradient checkpointing
    (non-reentrant: the spans reach the recomputed layers too). The gradient of the summed loss over a packed
    micro-batch equals the sum of the gradients of each example alone."""
    base = build_tiny_model("qwen3_next", tmp_path / "tiny-qwen3-next")
    model, _ = load_model(base, Hyperparameters(lora_rank=4, lora_dropout=0.0), "cpu", torch.float32, recompute=True)
    per_example = isolate_packed_examples(model) > 0
    with torch.no_grad():  # B starts at zero: give the adapters a value so that their gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    rows = examples(seed=1)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def gradients(batches):
        model.zero_grad()
        for batch in batches:
            loss_sum(model, batch, per_example=per_example).backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    packed = gradients([collate(rows, 0)])
    alone = gradients([collate([[e]], 0) for row in rows for e in row])
    linear_attention = [n for n in lora if "linear_attn" in n]
    assert linear_attention and all(alone[n].abs().max() > 0 for n in linear_attention)
    for n in lora:
        scale = alone[n].abs().max()
        assert (packed[n] - alone[n]).abs().max() <= 1e-5 * max(scale, 1.0), n


def test_packing_in_bf16_keeps_examples_apart_within_bf16_rounding():
    """The GPU's 16-bit path, on the CPU: the leak without the per-example path is far above bf16 rounding."""
    model, rows = tiny("qwen3_next", torch.bfloat16), examples()
    with torch.no_grad():
        leaky = max(token_losses(model, rows))
        per_example = isolate_packed_examples(model) > 0
        kept_apart = max(token_losses(model, rows, per_example=per_example))
    assert leaky > 5e-2 and kept_apart < 2e-2, (leaky, kept_apart)


@pytest.mark.parametrize("model_type, overrides", [
    ("jamba", dict(num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                   expert_layer_offset=1, num_experts=4, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False)),
    ("mamba", dict(num_hidden_layers=2, state_size=8)),
    ("zaya", dict(num_hidden_layers=2)),  # its attention runs a causal convolution: found by that, not by name
])
def test_architectures_whose_layers_cannot_run_per_example_train_unpacked(model_type, overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides}).to_dict()
    supported, note = packing_support(config)
    assert (not supported and note.startswith(f"off: {model_type} has layers (")
            and "one conversation per sequence" in note)


def test_a_job_on_qwen3_next_reports_how_its_packed_examples_are_kept_apart(tmp_path):
    base = build_tiny_model("qwen3_next", tmp_path / "tiny-qwen3-next")
    hp = Hyperparameters(max_steps=2, batch_size=2, max_seq_length=2048, lora_rank=4, val_fraction=0,
                         compute_dtype="bfloat16")
    metrics = train(load_dataset(SAMPLE)[0][:8], base, tmp_path / "adapter", hp).metrics
    assert metrics["packing"] == "on: a block-diagonal attention mask; Qwen3NextGatedDeltaNet run per example"
    assert metrics["sequences"] < metrics["examples"] and metrics["compute_dtype"] == "bfloat16"
    assert math.isfinite(metrics["train_loss_last"])
