"""vLLM's LoRA rules on real PEFT adapters of tiny random models: a clean adapter passes, each broken rule
is reported once, by name."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from compat import lora_targets_as_named
from conftest import SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters
from serving import MAX_LORA_RANKS, RULES, check_adapter, check_rank
from train_lora import train

DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)


def adapter(tmp_path, model_class=MistralForCausalLM, config=None, **lora):
    """A PEFT adapter saved as the worker saves one (save_pretrained), on a tiny random model."""
    torch.manual_seed(0)
    model = model_class(config or MistralConfig(**TINY))
    out = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": DENSE}
                                     | lora)).save_pretrained(out)
    return out


def one_violation(problems: list[str], rule: str) -> str:
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{rule}: ") and RULES[rule] in problems[0], problems
    return problems[0]


def test_a_plain_lora_on_every_linear_layer_passes(tmp_path):
    assert check_adapter(adapter(tmp_path), "MistralForCausalLM", max_rank=16) == []
    assert check_adapter(adapter(tmp_path, r=512), "MistralForCausalLM") == []  # no endpoint rank given: up to 512


def test_a_rank_over_the_endpoints_max_lora_rank(tmp_path):
    problem = one_violation(check_adapter(adapter(tmp_path, r=32), "MistralForCausalLM", max_rank=16), "rank")
    assert "r 32 exceeds the serving endpoint's max_lora_rank 16" in problem and "set r to 16 or less" in problem


def test_rank_pattern_counts_its_largest_rank(tmp_path):
    problem = one_violation(check_adapter(adapter(tmp_path, r=8, rank_pattern={"q_proj": 32}), "MistralForCausalLM",
                                          max_rank=16), "rank")
    assert "32 exceeds" in problem and "rank_pattern" in problem


def test_modules_to_save(tmp_path):
    problem = one_violation(check_adapter(adapter(tmp_path, modules_to_save=["lm_head"]), "MistralForCausalLM", 16),
                            "modules_to_save")
    assert "['lm_head']" in problem


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("model_class, config, architecture", [
    (MistralForCausalLM, MistralConfig(**TINY), "MistralForCausalLM"),  # no biases: only the config says so
    (Qwen2ForCausalLM, Qwen2Config(**TINY), "Qwen2ForCausalLM"),  # q/k/v biases: saved beside the LoRA weights
])
def test_trained_biases(tmp_path, bias, model_class, config, architecture):
    problem = one_violation(check_adapter(adapter(tmp_path, model_class, config, bias=bias), architecture, 16), "bias")
    assert f"bias {bias!r}" in problem and 'bias="none"' in problem


def test_dora(tmp_path):
    one_violation(check_adapter(adapter(tmp_path, use_dora=True), "MistralForCausalLM", 16), "dora")


def test_a_module_vllm_does_not_adapt_for_the_architecture(tmp_path):
    """vLLM has no LoRA on Mistral's embeddings (MistralForCausalLM.embedding_modules = {}); Llama has."""
    saved = adapter(tmp_path, target_modules=["q_proj", "lm_head"])
    problem = one_violation(check_adapter(saved, "MistralForCausalLM", 16), "target_modules")
    assert "LoRA on ['lm_head']" in problem and "lora_target_modules" in problem
    assert check_adapter(saved, "LlamaForCausalLM", 16) == []


def test_an_adapter_that_matches_no_module_of_the_served_model(tmp_path):
    """Trained on MistralModel (no `model.` in its paths): vLLM's name check passes, nothing is applied."""
    saved = adapter(tmp_path, MistralModel, target_modules=["q_proj", "v_proj"])
    problem = one_violation(check_adapter(saved, "MistralForCausalLM", 16), "no_effect")
    assert "layers.0.self_attn.q_proj" in problem and "silently serves the base model" in problem


def test_an_architecture_missing_from_the_table_is_said_so(tmp_path):
    [note] = check_adapter(adapter(tmp_path), "Gemma3ForCausalLM", 16)
    assert note.startswith("target_modules: not checked") and "Gemma3ForCausalLM" in note


QWEN3_NEXT = Qwen3NextConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, vocab_size=128)
QWEN3_NEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                      "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                      "shared_expert_gate"]


def test_qwen3_next_attention_linear_attention_and_shared_expert_pass(tmp_path):
    with lora_targets_as_named():  # as the worker attaches them: shared expert layers, not the fused experts
        saved = adapter(tmp_path, Qwen3NextForCausalLM, QWEN3_NEXT, target_modules=QWEN3_NEXT_TARGETS)
    assert check_adapter(saved, "Qwen3NextForCausalLM", 16) == []


def test_qwen3_next_fused_expert_lora_needs_the_mixed_moe_format(tmp_path):
    saved = adapter(tmp_path, Qwen3NextForCausalLM, QWEN3_NEXT, target_modules=["q_proj"], lora_dropout=0.0,
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    problem = one_violation(check_adapter(saved, "Qwen3NextForCausalLM", 16), "moe_3d")
    assert "--enable-mixed-moe-lora-format" in problem and "is_3d_lora_weight" in problem


def test_check_rank_before_training():
    assert "lora_rank 32 exceeds the serving endpoint's max_lora_rank 16" in check_rank(32, 16)
    assert check_rank(16, 16) is None and check_rank(32, None) is None
    assert "largest max_lora_rank vLLM accepts" in check_rank(1024, None)
    assert "not a value vLLM accepts" in check_rank(8, 24) and 24 not in MAX_LORA_RANKS


@pytest.mark.parametrize("model", ["tiny_mistral", "tiny_qwen2"])
def test_what_the_worker_trains_by_default_passes_every_rule(model, request, tmp_path):
    """The worker's own adapter (`all-linear`, rank 16, 4-bit base, saved in bf16) for the app's architecture."""
    base = request.getfixturevalue(model)
    train(load_dataset(SAMPLE)[0][:8], base, tmp_path / "adapter", Hyperparameters(max_steps=1, max_seq_length=256))
    architecture = json.loads((base / "config.json").read_text())["architectures"][0]
    assert check_adapter(tmp_path / "adapter", architecture, max_rank=16) == []
