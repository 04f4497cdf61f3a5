"""The adapter's directory as the app deploys it: LoRA weights in their saved dtype, a config stock PEFT loads whole,
the tokenizer and a generation config that stop at the end-of-turn token, the training config (the job as given and
what setup chose), the metrics, the per-step log and its loss chart. Written by rank 0, whole or not at all."""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import GenerationConfig

from chat_templates import end_of_turn_token
from compat import stock_loadable_config
from files import atomic_dir
from job import JobError
from model_loading import KBIT_PREPARATION

# recorded in training_config.json
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers")


def adapter_save_dtype(setting: str, compute_dtype):
    """The dtype the LoRA weights are saved in. They train in fp32; saved in 16-bit they take half the
    bytes (the app buffers each file in memory to copy it), at a rounding far below what training moves
    them: bf16, or fp16 where the GPU computes in fp16 (no bf16), unless the job asks for another."""
    if setting == "auto":
        return torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
    return getattr(torch, setting)


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def lora_weights(model, dtype) -> dict:
    """What PEFT's save_pretrained writes, named as in the model's state dict and cast to `dtype` once: the LoRA
    weights, and the embedding layers' own weights where LoRA adapts an embedding or the output layer (PEFT saves
    those whole). Given to save_pretrained as its `state_dict`, they are cast once and written once."""
    adapted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if hasattr(m, "base_layer")]
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if any(module is m for m in adapted))
    return {name: param.detach().to(dtype) for name, param in model.named_parameters(remove_duplicate=False)
            if "lora_" in name or name.startswith(prefixes)}


def write_adapter(model, tokenizer, eot_text: str, tmp: Path, config: dict, metrics: dict, training_log: Path,
                  dtype) -> None:
    """The adapter's files in `tmp`: LoRA weights (in `dtype`), a config stock PEFT loads whole, the tokenizer and a
    generation config that stop at the end-of-turn token, the training config, metrics, the per-step log (a copy of
    `training_log`) and its loss chart."""
    model.save_pretrained(tmp, state_dict=lora_weights(model, dtype))
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
    stop_ids = list(dict.fromkeys(i for i in (tokenizer.convert_tokens_to_ids(eot_token), tokenizer.eos_token_id)
                                  if i is not None))
    tokenizer.eos_token = eot_token
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    (tmp / "training_config.json").write_text(json.dumps(config, indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.copyfile(training_log, tmp / "training_log.jsonl")
    plot_losses(tmp / "training_log.jsonl", tmp / "loss_curve.png")


def plot_losses(training_log: Path, path: Path) -> None:
    """Training loss per step and validation loss (where measured), as a PNG for a person to look at."""
    import matplotlib  # here: its backend is chosen before pyplot loads, and only this chart needs it

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


# ---------------------------------------------------------------------------- what a training run delivers

def run_metrics(run, seconds: dict, kept: dict, peaks: list[float]) -> dict:
    """What the job measured (metrics.json, the handler's result), from the trainer's `run` (train_lora.Run).
    `kept`: the training record of the step whose weights are delivered; `peaks`: each rank's peak memory (GB)."""
    s, plan, data = run.state, run.plan, run.data
    tokens_per_second = s.real_tokens / max(seconds["train"], 1e-9)
    return {
        "train_loss_first": s.first_loss, "train_loss_last": s.last_record["loss"],
        "train_loss_kept": kept.get("loss"), "validation_loss": kept.get("validation_loss"), "best_epoch": s.best_epoch,
        "stop_reason": s.stop_reason, "validation_losses": s.validation_losses,
        "validation_tokens": run.validation_tokens,
        "steps": s.step, "epochs": s.epoch, **data.counts, "sequences": len(data.train),
        "tokens": s.real_tokens, "trained_tokens": s.trained_tokens,
        "token_efficiency": s.real_tokens / max(s.computed_tokens, 1),
        "wall_seconds": seconds["wall"], "load_seconds": seconds["load"], "train_seconds": seconds["train"],
        "base_weights": run.base_weights, "tokens_per_second": tokens_per_second, "world_size": run.world.size,
        "tokens_per_second_per_gpu": tokens_per_second / run.world.size,
        "peak_memory_gb": max(peaks), "peak_memory_gb_per_gpu": peaks, "gradient_checkpointing": plan.recompute,
        "recomputation": plan.recompute_reason, "device": run.device, "attention": plan.attention,
        "compute_dtype": str(run.compute_dtype).removeprefix("torch."), "length_report": data.length_report,
        "labelled": data.labelled, "chat_format": run.chat_format.describe(), "memory_estimate": run.estimate.to_dict(),
        "resumed_from_step": run.resumed_from, "packing": data.packing_note, "warnings": data.warnings + run.warnings,
        "checkpoints": {k: run.checkpoints[k] for k in ("written", "seconds")}, "skipped_steps": s.skipped_steps,
        "loss_scale": run.scaler.get_scale() if run.scaler.is_enabled() else None,
    }


def training_config(run) -> dict:
    """training_config.json: the job as given and what setup chose (the plan, the optimizer, the quantization)."""
    optimizer = type(run.optimizer)
    quantization = run.model.get_base_model().config.quantization_config
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    return {"base_model": run.job.base_model, "base_model_path": str(run.job.base_path),
            "hyperparameters": run.hp.model_dump(mode="json"), "plan": asdict(run.plan), "effective": {
                "lora_alpha": run.hp.effective_lora_alpha,
                "optimizer": f"{optimizer.__module__.split('.')[0]}.{optimizer.__name__}",
                "scheduler": run.plan.schedule,
                "quantization": quantization["bnb_4bit_quant_type"]
                + (" + double quantization" if quantization["bnb_4bit_use_double_quant"] else ""),
                "chat_format": run.chat_format.describe(), "kbit_preparation": KBIT_PREPARATION,
                "adapter_dtype": str(run.save_dtype).removeprefix("torch.")},
            "seed": run.hp.seed, "versions": library_versions(), "device": run.device}


def save(run, metrics: dict) -> None:
    """Rank 0 writes the adapter and its files into a fresh directory renamed into place."""
    if not run.world.main:
        return
    try:
        with atomic_dir(run.job.output_dir) as tmp:
            write_adapter(run.model, run.tokenizer, run.chat_format.end_of_turn, tmp, training_config(run), metrics,
                          run.log.path, run.save_dtype)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
        reason = getattr(exc, "strerror", None) or exc
        raise JobError(f"could not save the adapter ({reason}): free space on the volume and resubmit the job; it "
                       "resumes from its final checkpoint without training again") from None
