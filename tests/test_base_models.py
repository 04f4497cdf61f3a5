"""Base models: lookup, the memory estimate from config.json, and 4-bit fused MoE experts."""

import json
import math
import subprocess
import sys

import pytest
import torch
from bitsandbytes.nn import Params4bit
from transformers import AutoConfig, AutoModelForCausalLM

from base_models import (count_parameters, does_not_fit_message, estimate_job_memory, quantize_moe_experts,
                         resolve_base_model, trust_remote_code_for)
from conftest import ROOT, SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters, JobError
from tiny_model import build_tiny_model
from train_lora import quantization_config, train

CONFIGS = ROOT / "data" / "model-configs"


@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "qwen2.5-7b", "qwen3-8b", "qwen3-next-80b-a3b"])
def test_parameter_count_from_config_equals_the_real_architecture(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_qwen3_next(tmp_path_factory):
    return build_tiny_model("qwen3_next", tmp_path_factory.mktemp("tiny-qwen3-next"))


def four_bit_weights(model) -> int:
    """Weights stored in 4-bit: packed Params4bit elements x weights per element."""
    return sum(p.numel() * p.element_size() * 2 for p in model.parameters() if isinstance(p, Params4bit))


def test_fused_experts_stay_16_bit_in_the_stock_path_and_are_4_bit_after_the_swap(tiny_qwen3_next):
    config = json.loads((tiny_qwen3_next / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_next, quantization_config=quantization_config(torch.float32),
                                                 dtype=torch.float32)
    assert four_bit_weights(model) == count_parameters(config, quantize_experts=False)["quantized"]
    assert quantize_moe_experts(model, torch.float32) == 4
    counts = count_parameters(config)
    assert four_bit_weights(model) == counts["quantized"] and counts["experts"] > 0
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n, _ in model.named_parameters())


def test_quantized_experts_compute_what_the_fused_module_computes_with_the_same_weights(tiny_qwen3_next):
    import copy

    import bitsandbytes.functional as F

    from base_models import _quantized_experts_class

    fused = AutoModelForCausalLM.from_pretrained(tiny_qwen3_next, dtype=torch.float32).model.layers[0].mlp.experts
    quantized = _quantized_experts_class()(fused, torch.float32)
    reference = copy.deepcopy(fused)
    with torch.no_grad():
        for e in range(fused.num_experts):
            reference.gate_up_proj[e] = F.dequantize_4bit(quantized.gate_up[e].weight.data, quantized.gate_up[e].weight.quant_state)
            reference.down_proj[e] = F.dequantize_4bit(quantized.down[e].weight.data, quantized.down[e].weight.quant_state)
    torch.manual_seed(0)
    x, index, weights = torch.randn(16, 64), torch.randint(0, 4, (16, 2)), torch.rand(16, 2)
    assert torch.allclose(quantized(x, index, weights), reference(x, index, weights), atol=1e-5)


def test_a_tiny_qwen3_next_trains_a_step_in_4_bit_with_lora_off_the_routed_experts(tiny_qwen3_next, tmp_path):
    hp = Hyperparameters(max_steps=2, batch_size=2, max_seq_length=768, lora_rank=4, warmup_steps=0)
    result = train(load_dataset(SAMPLE)[0][:4], tiny_qwen3_next, tmp_path / "adapter", hp)
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["train_loss_last"])
    lora = [n for n, _ in result.model.named_parameters() if "lora_A" in n]
    assert any("linear_attn" in n for n in lora) and any("self_attn" in n for n in lora)
    assert not any(".experts." in n for n in lora)
    # PEFT 0.21 remaps gate_proj/up_proj/down_proj of Qwen-MoE model types onto the fused expert tensors, so the
    # shared expert's projections are not adapted (its gate is); see README "Qwen3-Next".
    assert any("shared_expert_gate" in n for n in lora)
    # the fit check counts the load peak, when the fused experts are still 16-bit
    assert result.metrics["memory_estimate"]["quantized_fraction"] < 0.5


def test_the_estimate_says_the_stock_path_cannot_fit_qwen3_next_80b_and_the_4bit_experts_can(tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "qwen3-next-80b-a3b.json").read_text())
    run = subprocess.run([sys.executable, "train_lora.py", "estimate", "--base-model", str(tmp_path), "--gpu-memory-gb", "80",
                          "--json"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert {"required_gb", "weights_gb", "fits", "micro_batch_size", "gradient_accumulation_steps", "quantized_fraction"} <= set(result)
    assert result["fits"] and result["quantized_fraction"] > 0.98 and 35 < result["weights_gb"] < 45
    assert not result["stock_path"]["fits"] and result["stock_path"]["weights_gb"] > 140


def test_a_smaller_micro_batch_keeps_the_requested_effective_batch():
    config = json.loads((CONFIGS / "qwen2.5-7b.json").read_text())
    roomy = estimate_job_memory(config, batch_size=8, gpu_memory_gb=80)
    tight = estimate_job_memory(config, batch_size=8, gpu_memory_gb=16)
    assert (roomy.micro_batch_size, roomy.gradient_accumulation_steps) == (8, 1)
    assert tight.fits and tight.micro_batch_size < 8 and tight.micro_batch_size * tight.gradient_accumulation_steps == 8


def test_a_job_that_cannot_fit_says_how_much_it_needs_and_what_to_change():
    config = json.loads((CONFIGS / "qwen3-next-80b-a3b.json").read_text())
    estimate = estimate_job_memory(config, gpu_memory_gb=24, batch_size=4)
    assert not estimate.fits and estimate.micro_batch_size == 1
    message = does_not_fit_message("Qwen3-Next-80B-A3B-Instruct", estimate, 2048)
    assert message.startswith("Qwen3-Next-80B-A3B-Instruct needs ~") and "the GPU has 24 GB free" in message


def test_allow_list_download_switch_and_remote_code(tmp_path):
    with pytest.raises(JobError, match="not on this worker's allow-list"):
        resolve_base_model("evil/model", [tmp_path], allowed=["Qwen/Qwen2.5-7B-Instruct"])
    with pytest.raises(JobError, match="set ALLOW_MODEL_DOWNLOAD=true"):
        resolve_base_model("Qwen/Qwen2.5-7B-Instruct", [tmp_path])
    assert not trust_remote_code_for("some/model", []) and trust_remote_code_for("some/model", ["some/model"])
