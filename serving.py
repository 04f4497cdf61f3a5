"""Will the vLLM endpoint serve this adapter? vLLM's LoRA rules, checked on a saved PEFT adapter.

The finished adapter is served by a vLLM endpoint (`enable_lora`, `max_loras=1`, `max_lora_rank` from
SERVING_MAX_LORA_RANK) that loads it through LORA_MODULES. vLLM refuses some PEFT adapters when it loads
them, and silently serves the base model for others. `check_adapter` reads adapter_config.json and the
weight NAMES of adapter_model.safetensors (no tensor is loaded) and returns one message per broken rule,
naming the rule, what in the adapter breaks it, the fix and the vLLM source; `check_rank` is the rank rule
alone, for validating a job before training. Every rule is read from vLLM's own code (`RULES`); vLLM
accepts what is not listed here, e.g. `use_rslora` (scaling alpha/sqrt(r)), `layers_to_transform` and
`lora_dropout` (ignored keys), and casts the weights to its `lora_dtype`.
"""

import json
import re
from pathlib import Path

from safetensors import safe_open

VLLM = "vLLM v0.34.0 (62d4bc3c7)"
# LoRAConfig.max_lora_rank: MaxLoRARanks = Literal[...], default 16 (vllm/config/lora.py).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

RULES = {  # rule -> where vLLM implements it
    "rank": f"{VLLM} vllm/config/lora.py MaxLoRARanks; vllm/lora/peft_helper.py PEFTHelper.validate_legal "
            "'LoRA rank {max_rank} is greater than max_lora_rank' (max_rank = max of r and rank_pattern)",
    "required_fields": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper.from_dict 'Missing required configuration fields'",
    "modules_to_save": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._validate_features 'vLLM only supports "
                       "modules_to_save being either None or [\"classifier\", \"score\"] for classification models'",
    "bias": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper.validate_legal 'Adapter bias is not supported.' "
            "(bias != \"none\"; lora_bias: 'vLLM does not support LoRA bias (lora_bias).')",
    "dora": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._validate_features 'vLLM does not yet support DoRA.'",
    "init_lora_weights": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._init_is_supported (strings other than "
                         "gaussian, eva, orthogonal, mica, lora_ga: PiSSA, OLoRA, CorDA, LoftQ)",
    "peft_feature": f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._validate_features (aLoRA, layer_replication, "
                    "BD-LoRA, QALoRA)",
    "weight_names": f"{VLLM} vllm/lora/utils.py parse_fine_tuned_lora_name '{{name}} is unsupported LoRA weight'",
    "target_modules": f"{VLLM} vllm/lora/lora_model.py LoRAModel.from_local_checkpoint 'expected target modules "
                      "in ... but received ...' (expected = vllm/lora/worker_manager.py _load_adapter from "
                      "get_supported_lora_modules + the model's packed_modules_mapping)",
    "no_effect": f"{VLLM} vllm/lora/model_manager.py activate_adapter: weights of no model module are skipped, "
                 "'No LoRA weights were applied ... Requests may use the base model' is a debug log "
                 "(vllm-project/vllm#34186, open)",
    "moe_3d": f"{VLLM} vllm/lora/model_manager.py _validate_moe_lora_format 'contains fused 3D MoE weights ... "
              "Start the engine with enable_mixed_moe_lora_format=True'",
}

# Adapter-visible module names (last part of a module path) vLLM loads LoRA on, per architecture: the
# linear layers of vLLM's model with packed ones unpacked (packed_modules_mapping), plus embedding_modules.
_DENSE = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
SUPPORTED_MODULES = {
    "LlamaForCausalLM": (_DENSE | _EMBEDDINGS, "vllm/model_executor/models/llama.py"),
    "MistralForCausalLM": (_DENSE, "vllm/model_executor/models/mistral.py (embedding_modules = {})"),
    "Qwen2ForCausalLM": (_DENSE, "vllm/model_executor/models/qwen2.py (no embedding_modules)"),
    "Qwen3ForCausalLM": (_DENSE | _EMBEDDINGS, "vllm/model_executor/models/qwen3.py"),
    # Full and linear (Gated DeltaNet) attention, router, shared expert; routed experts per expert
    # (experts.<e>.gate_proj/up_proj/down_proj) or fused (`experts`, see the moe_3d rule).
    "Qwen3NextForCausalLM": (_DENSE | {"in_proj_qkvz", "in_proj_ba", "out_proj", "conv1d", "gate",
                                       "shared_expert_gate"},
                             "vllm/model_executor/models/qwen3_next.py, layers/mamba/gdn/qwen_gdn_linear_attn.py"),
}
MOE_ARCHITECTURES = {"Qwen3NextForCausalLM"}
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
_EXPERT = re.compile(r"experts\.\d+\.(gate_proj|up_proj|down_proj)")
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq")


def _msg(rule: str, problem: str, fix: str) -> str:
    return f"{rule}: {problem}: {fix} ({RULES[rule]})"


def check_rank(rank: int, max_rank: int | None, field: str = "lora_rank") -> str | None:
    """The rank rule alone, for a job before it trains: None when an endpoint with `max_rank`
    (SERVING_MAX_LORA_RANK; None: not known, any max_lora_rank vLLM accepts) will take `rank`."""
    if max_rank is not None and max_rank not in MAX_LORA_RANKS:
        return _msg("rank", f"the serving endpoint's max_lora_rank {max_rank} (SERVING_MAX_LORA_RANK) is not a "
                    "value vLLM accepts", f"set it to one of {', '.join(map(str, MAX_LORA_RANKS))}")
    if max_rank is not None and rank > max_rank:
        return _msg("rank", f"{field} {rank} exceeds the serving endpoint's max_lora_rank {max_rank} "
                    "(SERVING_MAX_LORA_RANK)",
                    f"set {field} to {max_rank} or less, or raise the endpoint's max_lora_rank")
    if rank > MAX_LORA_RANKS[-1]:
        return _msg("rank", f"{field} {rank} exceeds {MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts",
                    f"set {field} to {MAX_LORA_RANKS[-1]} or less")
    return None


def _config_problems(config: dict, max_rank: int | None) -> list[str]:
    out = []
    missing = sorted({"r", "lora_alpha", "target_modules"} - config.keys())
    if missing:
        out.append(_msg("required_fields", f"adapter_config.json lacks {missing}", "save the adapter with PEFT's "
                        "save_pretrained, which writes them"))
    pattern = config.get("rank_pattern") or {}
    rank = max([config.get("r") or 0, *pattern.values()])  # vLLM checks the largest, rank_pattern included
    if (problem := check_rank(rank, max_rank, "r (rank_pattern included)" if pattern else "r")) is not None:
        out.append(problem)
    if unsupported := [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        out.append(_msg("modules_to_save", f"modules_to_save {unsupported} (fully trained modules)",
                        "train without modules_to_save (LoRA on those layers instead, where supported)"))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        what = f"bias {config.get('bias')!r}" if config.get("bias", "none") != "none" else "lora_bias true"
        out.append(_msg("bias", f"{what} (trained bias weights)", 'train with bias="none" and lora_bias=False'))
    if config.get("use_dora"):
        out.append(_msg("dora", "use_dora true", "train with use_dora=False (plain LoRA)"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        out.append(_msg("init_lora_weights", f"init_lora_weights {init!r} modifies the base weights",
                        "train with init_lora_weights=True, or convert the adapter with PEFT's "
                        "path_initial_model_for_weight_conversion"))
    features = [k for k in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")
                if config.get(k)]
    if features:
        out.append(_msg("peft_feature", f"{', '.join(features)} set", "train a plain LoRA without them"))
    return out


def _module_name(path: str) -> str:
    """The name vLLM checks for a LoRA module path: `experts...` from the experts on, else the last part."""
    path = path.removesuffix(".base_layer")  # PEFT's fused-expert layout: experts.base_layer is gate_up_proj
    return path[path.find(".experts") + 1:] if ".experts" in path else path.rsplit(".", 1)[-1]


def _weight_problems(names: list[str], config: dict, architecture: str) -> list[str]:
    out, lora_modules, odd = [], [], []
    for name in names:
        path = name.removeprefix("base_model.model.")
        if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue  # the full embeddings PEFT saves beside embedding LoRA: vLLM skips them
        if name.endswith(_LORA_SUFFIXES):
            lora_modules.append(path.rsplit(".", 2 if name.endswith(".weight") else 1)[0])
        elif not (name.endswith((".bias", ".lora_magnitude_vector"))  # reported by the bias and dora rules
                  or path.rsplit(".", 1)[0] in (config.get("modules_to_save") or [])):
            odd.append(name)
    if odd:
        out.append(_msg("weight_names", f"adapter_model.safetensors holds non-LoRA weights {odd[:3]}",
                        "save only lora_A/lora_B weights (a plain PEFT LoRA)"))
    moe = architecture in MOE_ARCHITECTURES
    if moe and (fused := sorted({m.removesuffix(".base_layer") for m in lora_modules if _module_name(m) == "experts"})):
        out.append(_msg("moe_3d", f"fused MoE expert LoRA (target_parameters) on {fused[:2]}",
                        "start the endpoint with --enable-mixed-moe-lora-format and set is_3d_lora_weight: true in "
                        "its LORA_MODULES entry, or train without the routed experts"))
    if architecture not in SUPPORTED_MODULES:
        return out + [f"target_modules: not checked: the modules vLLM supports for {architecture} are not in "
                      f"serving.py's table (known: {', '.join(SUPPORTED_MODULES)}); the adapter has LoRA on "
                      f"{sorted({_module_name(m) for m in lora_modules})}"]
    supported, source = SUPPORTED_MODULES[architecture]
    unexpected = sorted({n for n in map(_module_name, lora_modules)
                         if not (n in supported or moe and (n == "experts" or _EXPERT.fullmatch(n)))})
    if unexpected:
        out.append(_msg("target_modules", f"LoRA on {unexpected}, which vLLM does not support for {architecture} "
                        f"(supported: {sorted(supported)}; {VLLM} {source})",
                        "set lora_target_modules to names from the supported list"))
    stray = [m for m in lora_modules if not (m.startswith("model.layers.") or m in ("model.embed_tokens", "lm_head"))]
    if not lora_modules or stray:
        problem = ("no LoRA weight in adapter_model.safetensors" if not lora_modules else
                   f"LoRA on {stray[:3]}, not module paths of vLLM's {architecture} (model.layers.<i>..., "
                   "model.embed_tokens, lm_head): vLLM loads the adapter and silently serves the base model")
        out.append(_msg("no_effect", problem, "train the adapter on the *ForCausalLM model (AutoModelForCausalLM), "
                        "as PEFT's get_peft_model wraps it"))
    return out


def check_adapter(adapter_dir: Path, architecture: str, max_rank: int | None = None) -> list[str]:
    """Violations of vLLM's LoRA rules by the PEFT adapter in `adapter_dir` for a base model of
    `architecture` (config.json `architectures[0]`) served with `max_rank` (None: any rank vLLM takes).
    Empty when vLLM will load and apply it."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="numpy") as f:  # names only: no torch
        names = sorted(f.keys())
    return _config_problems(config, max_rank) + _weight_problems(names, config, architecture)
