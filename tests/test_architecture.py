"""The architecture's facts from config.json: parameter counts, the memory estimate and the fit message, and MoE
experts quantized while loading (per expert, in 4-bit)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from bitsandbytes.nn import Params4bit
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from architecture import (
    count_parameters,
    does_not_fit_message,
    estimate_job_memory,
    expert_projection_names,
    experts_in_4bit,
    per_expert_names,
)
from compat import lora_targets_as_named
from conftest import ROOT, SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters, JobError
from model_loading import causal_lm_class, load_base_model, load_model, quantization_config, same_kernels_in_eval
from tiny_model import build_tiny_model
from train_lora import train

CONFIGS = ROOT / "data" / "model-configs"


# Exact totals (the model cards say 7.24B, 7.61B, 8.2B, 80B); cross-checked on 2026-11-22 against an
# independent per-layer formula from the configs, which gave the same four numbers.
@pytest.mark.parametrize("name, total",
                         [("mistral-7b-v0.1", 7_241_732_096), ("mistral-7b-instruct-v0.2", 7_241_732_096),
                          ("qwen2.5-7b", 7_615_616_512),
                          ("qwen3-8b", 8_190_735_360), ("qwen3-next-80b-a3b", 79_674_391_296)])


def test_parameter_counts_of_the_real_architectures(name, total):
    counts = count_parameters(json.loads((CONFIGS / f"{name}.json").read_text()))
    assert counts["total"] == total and counts["linear"] + counts["experts"] + counts["other"] == total





@pytest.fixture(scope="module")
def tiny_qwen3_next(tmp_path_factory):
    return build_tiny_model("qwen3_next", tmp_path_factory.mktemp("tiny-qwen3-next"))


def four_bit_weights(model) -> int:
    """Weights stored in 4-bit: packed Params4bit elements x weights per element."""
    return sum(p.numel() * p.element_size() * 2 for p in model.parameters() if isinstance(p, Params4bit))


def test_fused_experts_stay_16_bit_in_the_stock_path_and_load_in_4_bit_per_expert(tiny_qwen3_next):
    config = json.loads((tiny_qwen3_next / "config.json").read_text())
    counts = count_parameters(config)
    stock = AutoModelForCausalLM.from_pretrained(tiny_qwen3_next,
                                                 quantization_config=quantization_config(torch.float32),
                                                 dtype=torch.float32)
    assert four_bit_weights(stock) == count_parameters(config, quantize_experts=False)["quantized"]
    assert any(n.endswith("experts.gate_up_proj") for n, _ in stock.named_parameters())

    model = causal_lm_class(tiny_qwen3_next).from_pretrained(
        tiny_qwen3_next, quantization_config=quantization_config(torch.float32), dtype=torch.float32)
    assert four_bit_weights(model) == counts["quantized"] and counts["experts"] > 0
    # every expert weight arrived as its own tensor and is 4-bit: there was never a fused 16-bit copy to hold
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert len(experts) == 4 * config["num_experts"] * 3 and all(isinstance(p, Params4bit) for p in experts.values())
    assert experts_in_4bit(config) and not experts_in_4bit(json.loads((CONFIGS / "qwen2.5-7b.json").read_text()))


TINY_MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)





@pytest.fixture(params=["qwen3_next", "qwen3_moe", "qwen2_moe"])
def tiny_moe(request, tiny_qwen3_next, tmp_path):
    if request.param == "qwen3_next":
        return tiny_qwen3_next
    extra = {"shared_expert_intermediate_size": 64} if request.param == "qwen2_moe" else {}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(request.param, **TINY_MOE, **extra))
    for p in model.parameters():  # from_config leaves some tensors (routers) at zero: random weights all through
        torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_the_per_expert_model_computes_what_the_fused_model_computes(tiny_moe):
    fused = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    per_expert = causal_lm_class(tiny_moe).from_pretrained(tiny_moe, dtype=torch.float32).eval()
    assert type(per_expert.model.layers[0].mlp.experts).__name__ == "PerExpertMoE"
    ids = torch.randint(0, fused.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(per_expert(ids).logits, fused(ids).logits, atol=1e-5)


def test_expert_names_come_from_transformers_own_checkpoint_mapping():
    assert expert_projection_names("qwen3_next") == ("gate_proj", "up_proj", "down_proj")
    assert expert_projection_names("qwen3_moe") == ("gate_proj", "up_proj", "down_proj")
    assert expert_projection_names("qwen2") is None  # dense: nothing to do
    assert expert_projection_names("mixtral") is None  # renamed on load (block_sparse_moe): left to the stock path
    # fused the same way, but their expert modules differ inside: the stock path, and the estimate says 16-bit
    for model_type in ("longcat_flash", "deepseek_v3"):
        assert expert_projection_names(model_type) is not None and per_expert_names(model_type) is None
        assert not experts_in_4bit({"model_type": model_type, "n_routed_experts": 8})


@pytest.mark.slow  # trains the tiny model
def test_a_tiny_qwen3_next_trains_a_step_in_4_bit_with_lora_off_the_routed_experts(tiny_qwen3_next, tmp_path):
    hp = Hyperparameters(max_steps=2, batch_size=2, max_seq_length=768, lora_rank=4, warmup_steps=0,
                         adapter_dtype="float32")
    result = train(load_dataset(SAMPLE)[0][:4], tiny_qwen3_next, tmp_path / "adapter", hp)
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["train_loss_last"])
    lora = [n for n, _ in result.model.named_parameters() if "lora_A" in n]
    assert any("linear_attn" in n for n in lora) and any("self_attn" in n for n in lora)
    assert not any(".experts." in n for n in lora)
    for projection in ("gate_proj", "up_proj", "down_proj"):  # the shared expert is adapted, PEFT's MoE remap aside
        assert any(f"shared_expert.{projection}" in n for n in lora)
    assert any("shared_expert_gate" in n for n in lora)
    # the fit check counts the experts in 4-bit: they are quantized while loading
    assert result.metrics["memory_estimate"]["quantized_fraction"] > 0.5
    # the saved adapter loads back onto the 4-bit base and reproduces the trained model
    base = same_kernels_in_eval(causal_lm_class(tiny_qwen3_next).from_pretrained(
        tiny_qwen3_next, quantization_config=quantization_config(torch.float32), dtype=torch.float32))
    with lora_targets_as_named():
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5)


STOCK_LOAD = """
import json, sys
import bitsandbytes as bnb, torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

base_dir, adapter_dir, ids, root = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4, dtype=torch.float32)
for m in base.modules():  # AVX512-BF16 CPUs: compute in eval with the kernel training used
    if isinstance(m, bnb.nn.Linear4bit):
        m.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, adapter_dir).eval()
saved, loaded = load_file(adapter_dir + "/adapter_model.safetensors"), get_peft_model_state_dict(model)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
ours = [n for n, m in sys.modules.items() if getattr(m, "__file__", None) and m.__file__.startswith(root)
        and "/.venv/" not in m.__file__]
print(json.dumps({"missing": sorted(set(saved) - set(loaded)), "extra": sorted(set(loaded) - set(saved)),
                  "unequal": sorted(k for k in saved
                                    if k in loaded and not torch.equal(loaded[k].to(saved[k].dtype), saved[k])),
                  "fused_experts": any(n.endswith("experts.gate_up_proj") for n, _ in base.named_parameters()),
                  "logits": logits.tolist(), "ours": ours}))
"""





@pytest.fixture(scope="module")
def qwen3_next_no_routed_experts(tiny_qwen3_next, tmp_path_factory):
    """The tiny Qwen3-Next with its routed experts' weights at zero, so the stock path (experts fused, 16-bit) and
    ours (experts per expert, 4-bit) compute the same model: the rest is quantized identically by both."""
    path = tmp_path_factory.mktemp("qwen3-next-zero-experts")
    shutil.copytree(tiny_qwen3_next, path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    zeroed = {k: torch.zeros_like(v) if ".experts." in k else v for k, v in weights.items()}
    assert sum(1 for k in weights if ".experts." in k) == 4 * 4 * 3  # 4 layers x 4 experts x gate/up/down
    save_file(zeroed, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.slow  # trains the tiny model and starts a process
def test_a_qwen3_next_adapter_loads_whole_with_stock_peft_in_a_process_of_its_own(qwen3_next_no_routed_experts,
                                                                                  tmp_path):
    base_dir = qwen3_next_no_routed_experts
    hp = Hyperparameters(max_steps=2, batch_size=2, max_seq_length=768, lora_rank=4, warmup_steps=0, learning_rate=1e-3)
    result = train(load_dataset(SAMPLE)[0][:4], base_dir, tmp_path / "adapter", hp)  # saved in bf16, as by default
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == [f"shared_expert.{p}.weight"
                                                   for p in ("down_proj", "gate_proj", "up_proj")]
    assert not any(t.endswith(("gate_proj", "up_proj", "down_proj")) for t in config["target_modules"])
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(3)).tolist()[0]
    run = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(base_dir), str(tmp_path / "adapter"), json.dumps(ids),
                          str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    stock = json.loads(run.stdout.strip().splitlines()[-1])
    assert stock["ours"] == [] and stock["fused_experts"]  # plain transformers and PEFT, the stock architecture
    # every tensor of the file, loaded
    assert stock["missing"] == [] and stock["extra"] == [] and stock["unequal"] == []
    assert "missing adapter keys" not in run.stderr.lower() and "not found in the base model" not in run.stderr
    saved = load_file_keys(tmp_path / "adapter" / "adapter_model.safetensors")
    assert (any(".shared_expert.gate_proj.lora_B" in k for k in saved)
            and any("linear_attn.in_proj_qkvz" in k for k in saved))
    # the logits: the stock load computes what the worker's own model with the same file computes, and that is
    # the trained model up to the 16-bit rounding of the saved LoRA weights
    base = same_kernels_in_eval(causal_lm_class(base_dir).from_pretrained(
        base_dir, quantization_config=quantization_config(torch.float32), dtype=torch.float32))
    with torch.no_grad():
        untrained = base(torch.tensor([ids])).logits
        with lora_targets_as_named():
            ours = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(torch.tensor([ids])).logits
        trained = result.model.eval()(torch.tensor([ids])).logits
    assert torch.allclose(torch.tensor(stock["logits"]), ours, atol=1e-5)
    effect = (trained - untrained).abs().max()
    assert effect > 1e-3 and (ours - trained).abs().max() < 0.01 * effect


def load_file_keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.mark.slow  # starts a process
def test_the_estimate_says_the_stock_path_cannot_fit_qwen3_next_80b_and_the_4bit_experts_can(tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "qwen3-next-80b-a3b.json").read_text())
    run = subprocess.run([sys.executable, "train_lora.py", "estimate", "--base-model", str(tmp_path),
                          "--gpu-memory-gb", "80", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert {"required_gb", "weights_gb", "fits", "micro_batch_size", "gradient_accumulation_steps",
            "quantized_fraction"} <= set(result)
    assert result["fits"] and result["quantized_fraction"] > 0.98 and 35 < result["weights_gb"] < 45
    assert not result["stock_path"]["fits"] and result["stock_path"]["weights_gb"] > 140





@pytest.mark.parametrize("batch, required_gb", [(2, 8.5), (4, 11.5), (16, 29.5)])
def test_the_apps_batches_on_its_a40_recompute_at_their_whole_micro_batch(batch, required_gb):
    """TRAINING.md's A40 table: Mistral-7B-Instruct-v0.2, 2048 tokens, rank 16, the A40's 45 GiB (48 GB): no batch fits
    without recomputation (71.5 GB at micro-batch 2), and with it every batch runs whole, without accumulation."""
    config = json.loads((CONFIGS / "mistral-7b-instruct-v0.2.json").read_text())
    plan = estimate_job_memory(config, max_seq_length=2048, batch_size=batch, lora_rank=16, gpu_memory_gb=45,
                               gradient_checkpointing="auto")
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing) == (batch, 1, True)
    assert plan.fits and round(plan.required_gb, 1) == required_gb
    assert estimate_job_memory(config, max_seq_length=2048, batch_size=2, lora_rank=16, gradient_checkpointing=False
                               ).required_gb > 45


def test_a_smaller_micro_batch_keeps_the_requested_effective_batch():
    config = json.loads((CONFIGS / "qwen2.5-7b.json").read_text())
    roomy = estimate_job_memory(config, batch_size=8, gpu_memory_gb=80)
    tight = estimate_job_memory(config, batch_size=8, gpu_memory_gb=16)
    assert (roomy.micro_batch_size, roomy.gradient_accumulation_steps) == (8, 1)
    assert tight.fits and tight.micro_batch_size < 8 and tight.micro_batch_size * tight.gradient_accumulation_steps == 8


def test_auto_checkpointing_recomputes_only_where_the_micro_batch_would_not_fit_without_it():
    config = json.loads((CONFIGS / "qwen2.5-7b.json").read_text())

    def estimate(batch_size, setting, gpu_memory_gb=80):
        return estimate_job_memory(config, batch_size=batch_size, gradient_checkpointing=setting,
                                   gpu_memory_gb=gpu_memory_gb)

    one, four = estimate(1, "auto"), estimate(4, "auto")
    assert not one.gradient_checkpointing and one.required_gb == estimate(1, False).required_gb <= 0.9 * 80
    # Four sequences of 2048 tokens would not fit without recomputing: on, and the micro-batch is kept (not traded).
    assert estimate(4, False, None).required_gb > 80
    assert (four.gradient_checkpointing and four.micro_batch_size == 4
            and four.required_gb == estimate(4, True).required_gb)
    assert not estimate(4, "auto", None).gradient_checkpointing  # no memory limit (a CPU): nothing to save memory for


@pytest.mark.parametrize("model_type, top_k", [("qwen3_next", "num_experts_per_tok"), ("olmoe", "num_experts_per_tok"),
                                                ("ernie4_5_moe", "moe_k")])


def test_moe_activations_are_counted_per_routed_expert(model_type, top_k):
    # Configs name experts differently (OLMoE: experts as wide as `intermediate_size`; ERNIE: `moe_k`).
    config = (json.loads((CONFIGS / "qwen3-next-80b-a3b.json").read_text()) if model_type == "qwen3_next" else
              dict(AutoConfig.for_model(model_type).to_dict(), num_hidden_layers=2))
    base = estimate_job_memory(config, batch_size=1, gradient_checkpointing=False)
    more = estimate_job_memory(dict(config, **{top_k: 2 * config[top_k]}), batch_size=1, gradient_checkpointing=False)
    assert more.total_parameters == base.total_parameters and more.activations_gb > 1.2 * base.activations_gb


def test_a_job_that_cannot_fit_says_how_much_it_needs_and_what_to_change():
    config = json.loads((CONFIGS / "qwen3-next-80b-a3b.json").read_text())
    estimate = estimate_job_memory(config, gpu_memory_gb=24, batch_size=4)
    assert not estimate.fits and estimate.micro_batch_size == 1
    message = does_not_fit_message("Qwen3-Next-80B-A3B-Instruct", estimate, 2048)
    assert message.startswith("Qwen3-Next-80B-A3B-Instruct needs ~") and "the GPU has 24 GB free" in message


@pytest.mark.slow  # about 10 s: quantizes the model, keeps its 4-bit copy and loads that
def test_the_4bit_copy_of_a_per_expert_model_keeps_its_experts(tiny_qwen3_next, tmp_path):
    quantized, source = load_base_model(tiny_qwen3_next, "cpu", torch.float32, quantized_cache=tmp_path)
    copied, copy_source = load_base_model(tiny_qwen3_next, "cpu", torch.float32, quantized_cache=tmp_path)
    assert (source, copy_source) == ("quantized while loading", "4-bit copy")
    assert (four_bit_weights(copied)
            == count_parameters(json.loads((tiny_qwen3_next / "config.json").read_text()))["quantized"])
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(copied.eval()(ids).logits, quantized.eval()(ids).logits)


def test_listed_targets_never_reach_the_routed_experts(tiny_qwen3_next):
    hp = Hyperparameters(lora_rank=4, lora_target_modules=["gate_proj", "q_proj"])
    model, _ = load_model(tiny_qwen3_next, hp, "cpu", torch.float32)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and not any(".experts." in n for n in adapted)
    assert sum(n.endswith("shared_expert.gate_proj") for n in adapted) == 4  # one per MoE layer


def test_moe_types_left_on_the_stock_path_are_sized_with_16_bit_experts():
    # DeepSeek-V2-Lite's layout (routed experts counted by `n_routed_experts`, MLA attention), scaled down
    config = dict(model_type="deepseek_v2", hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                  vocab_size=1000, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=32,
                  n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=64,
                  q_lora_rank=None,
                  qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64)
    counts = count_parameters(config, quantize_experts=experts_in_4bit(config))
    assert counts["experts"] == 2 * 32 * 3 * 256 * 128  # two MoE layers (the first is dense)
    assert counts["quantized"] == counts["linear"] and counts["experts"] > counts["quantized"]
    with pytest.raises(JobError, match="cannot size model type 'no-such-model'"):
        count_parameters({**config, "model_type": "no-such-model"})
