"""QLoRA training of a chat adapter: 4-bit NF4 base (bitsandbytes) + LoRA (PEFT), assistant tokens only.

The recipe reads top to bottom, in the manner of torchtune's:
    setup   - label the data (labelled_data.py); check the job fits from config.json alone; the Plan, decided once
              (plan.py); the 4-bit base with LoRA (model_loading.py); AdamW 8-bit and the plan's schedule; the
              TrainState of the newest checkpoint
    train   - `train_step` after `train_step`: each rank its share of the global batch, the loss (loss.py) the mean
              over the trained tokens of the whole batch, the LoRA gradients summed over the ranks; validation at
              each epoch's end keeps the best weights; checkpoints every N steps / M minutes / on SIGTERM
    save    - the best epoch's adapter and its files, by rank 0 (adapter.py)
    cleanup - the process group

One process per GPU (distributed.py: PyTorch's elastic launcher, NCCL; gloo on the CPU). The CPU runs the same
QLoRA path as the GPU (bitsandbytes 4-bit layers run on CPU), in fp32.

    python train_lora.py train    --dataset FILE --base-model DIR --output DIR [--processes N] [--epochs N ...]
    python train_lora.py preview  --dataset FILE --base-model DIR [--max-seq-length N] [--limit K] [--json]
    python train_lora.py estimate --base-model DIR_OR_ID [--max-seq-length N] [--batch-size B]
                                  [--gpu-memory-gb G] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import bitsandbytes as bnb
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import get_scheduler

import distributed
from adapter import adapter_save_dtype, run_metrics, save
from architecture import check_fits, estimate_command, isolate_packed_examples
from chat_labels import collate, preview, print_preview
from chat_templates import SkipExample, load_tokenizer
from checkpoints import (Cancelled, StopAsked, Stopped, TrainingLog, TrainState, capture, checkpoint_spacing,
                         load_latest_checkpoint, restore, save_checkpoint, stop_on_sigterm, stop_reason)
from dataset_loader import DatasetError, load_dataset
from device import autocast, free_gpu_memory_gb, gpu_utilization, loss_scaler, peak_memory_gb, select_precision
from files import sha256_of
from job import Hyperparameters, JobError, job_fingerprint, parse_hyperparameters
from labelled_data import Data, prepare_data
from loss import loss_sum
from model_hub import config_source, resolve_base_model
from model_loading import enable_recomputation, keep_copy_after_training, load_model
from plan import Plan, TrainJob, agree_on_estimate, epoch_order, make_plan

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]


# ---------------------------------------------------------------------------- setup

@dataclass
class Run:
    """The trainer's parts, built by `setup`."""
    job: TrainJob
    data: Data
    plan: Plan
    world: distributed.World
    device: str
    compute_dtype: Any
    model: Any
    tokenizer: Any
    chat_format: Any
    optimizer: Any
    scheduler: Any
    pad_id: int
    base_weights: str
    estimate: Any
    progress: ProgressFn
    save_dtype: Any  # the adapter's weights' (adapter.adapter_save_dtype)
    per_example_layers: int = 0  # linear-attention layers that run each packed example on its own
    state: TrainState = field(default_factory=TrainState)
    warnings: list = field(default_factory=list)
    resumed_from: int | None = None
    scaler: Any = None  # fp16's loss scaler (device.loss_scaler; a no-op in other dtypes)
    best: dict | None = None  # rank 0: the LoRA weights of the epoch `state.best_epoch`, as they are saved
    log: TrainingLog = field(default_factory=lambda: TrainingLog(None))  # the per-step records (rank 0)
    checkpoints: dict = field(default_factory=lambda: {"written": 0, "seconds": 0.0, "last_seconds": 0.0})

    @property
    def hp(self) -> Hyperparameters:
        return self.job.hp

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.job.checkpoint_dir

    @property
    def validation_tokens(self) -> int:
        return sum(example.num_trained for sequence in self.data.validation for example in sequence)

    def best_weights(self) -> dict | None:
        """A copy of the LoRA weights in the dtype the adapter is saved in (rank 0, which saves; None elsewhere)."""
        return {k: v.detach().to("cpu", self.save_dtype, copy=True)
                for k, v in get_peft_model_state_dict(self.model).items()} if self.world.main else None

    @property
    def trainable(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def batch(self, sequences):
        pad_to = self.hp.max_seq_length if self.plan.attention == "flex_attention" else None  # one compile per length
        return collate(sequences, self.pad_id, self.device, attention=self.plan.attention, pad_to=pad_to)

    def loss_sum(self, batch):
        """`loss_sum` of a micro-batch as this run computes it (its attention, its per-example layers)."""
        return loss_sum(self.model, batch, self.plan.attention != "flash_attention_2", self.per_example_layers > 0)


def setup(data: Data, job: TrainJob, world: distributed.World, device: str, compute_dtype,
          progress: ProgressFn) -> Run:
    hp = job.hp
    estimate = check_fits(job.base_path, hp, job.base_path.name, compute_dtype=compute_dtype,
                          free_gb=free_gpu_memory_gb(device), trust_remote_code=job.trust_remote_code,
                          world_size=world.size)
    plan = make_plan(data, hp, agree_on_estimate(estimate, hp, world, device), world.size, device, job.base_path)
    log.info("plan: %s; %d examples -> %d sequences of <= %d tokens", plan, data.counts["examples"], len(data.train),
             hp.max_seq_length)
    progress({"stage": "loading_model"})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokenizer, chat_format = load_tokenizer(job.base_path, job.trust_remote_code)
    model, base_weights = load_model(job.base_path, hp, device, compute_dtype, job.trust_remote_code, plan.attention,
                                     job.quantized_cache, plan.recompute, keep_copy=world.size == 1)  # else: after
    model.train()
    torch.manual_seed(hp.seed + world.rank)  # LoRA was initialised alike on every rank; dropout differs per rank
    # 8-bit AdamW states; not the paged variant, whose buffers bitsandbytes never frees (a warm worker would leak them)
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate,
                                    weight_decay=hp.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run = Run(job, data, plan, world, device, compute_dtype, model, tokenizer, chat_format, optimizer,
              get_scheduler(plan.schedule, optimizer, plan.warmup_steps, plan.total_steps), pad_id, base_weights,
              estimate, progress, adapter_save_dtype(hp.adapter_dtype, compute_dtype),
              scaler=loss_scaler(device, compute_dtype),
              # packed examples in linear-attention / state-space layers: each on its own
              per_example_layers=isolate_packed_examples(model) if data.packing else 0)
    if job.checkpoint_dir is not None:
        resume(run)
    if world.main:  # the per-step log beside the checkpoints (without them: a directory of its own, removed at the end)
        directory = job.checkpoint_dir or Path(tempfile.mkdtemp(prefix="lora-training-log-"))
        run.log = TrainingLog(directory / "training_log.jsonl")
        if (lost := run.log.start(run.state.step)) is not None:
            run.warnings.append(lost)
    return run


def resume(run: Run) -> None:
    """The newest checkpoint of this job restored into `run`, on every rank alike (or none, on every rank)."""
    saved, run.warnings = load_latest_checkpoint(run.checkpoint_dir, run.job.fingerprint, set_aside=run.world.main)
    if saved is not None:
        restore(run, saved)
        if run.state.recompute_from is not None and not run.plan.recompute:  # "auto" met an out-of-memory step
            recompute_from(run, run.state.recompute_from)
    (steps,) = distributed.sum_over_ranks(run.world, [run.state.step], run.device)
    if steps != run.state.step * run.world.size:  # a rank could not read the checkpoint the others resumed from
        raise JobError(f"the training processes resumed from different checkpoints (rank {run.world.rank}: step "
                       f"{run.state.step}); resubmit the job, and if it fails again set retrain: true")


# ---------------------------------------------------------------------------- train

def _forward_backward(run: Run, batches: list, n_trained: float) -> float:
    total = 0.0
    for batch in batches:
        with autocast(run.device, run.compute_dtype):
            loss = run.loss_sum(batch) / n_trained
        run.scaler.scale(loss).backward()
        total = loss.detach() + total  # stays on the device: nothing is read back until the step's end
    return float(total)


def _backward(run: Run, batches: list, n_trained: float) -> float:
    """Forward and backward over this rank's micro-batches, each loss divided by the trained tokens of the whole global
    batch; this rank's share of the step's loss. Out of memory under "auto": recompute from now on, and redo."""
    while True:
        try:
            return _forward_backward(run, batches, n_trained)
        except torch.OutOfMemoryError:
            pass  # handled here, once the failed step's activations are freed with its frames (its graph included)
        run.optimizer.zero_grad(set_to_none=True)
        step, resubmit = run.state.step + 1, " (it resumes from the last checkpoint)" if run.checkpoint_dir else ""
        if run.plan.recompute:
            raise JobError(f"the GPU ran out of memory at step {step} with micro-batch {run.plan.micro_batch_size} x "
                           f"up to {run.hp.max_seq_length} tokens; reduce hyperparameters.micro_batch_size (or "
                           f"batch_size), max_seq_length or lora_rank, and resubmit{resubmit}")
        if run.hp.gradient_checkpointing is False:
            raise JobError(f"the GPU ran out of memory at step {step} with gradient_checkpointing false; set it to "
                           f"\"auto\" or true (or reduce micro_batch_size or max_seq_length) and resubmit{resubmit}")
        log.warning("out of memory at step %d without gradient checkpointing: turning it on and redoing the step", step)
        recompute_from(run, step)
        if run.device == "cuda":
            torch.cuda.empty_cache()


def recompute_from(run: Run, step: int) -> None:
    """Recomputation on from `step` on, for good: "auto" met an out-of-memory step without it (then, or before a
    resume). The one place the plan changes; the state carries the step into checkpoints."""
    enable_recomputation(run.model)
    run.plan = dataclasses.replace(run.plan, recompute=True, recompute_reason=f"on from step {step} (out of memory "
                                   "without it)")
    run.state.recompute_from = step


def train_step(run: Run, sequences: list, stop) -> tuple[dict, bool]:
    """One optimizer step on this rank's share of `sequences` (the global batch): its record, and whether any rank
    was asked to stop (`stop`, read once this rank's backward is done: every rank then stops after this same step)."""
    started, world, micro = time.monotonic(), run.world, run.plan.micro_batch_size
    mine = sequences[world.rank::world.size]
    batches = [run.batch(mine[i:i + micro]) for i in range(0, len(mine), micro)]
    (n_trained,) = distributed.sum_over_ranks(world, [sum(b["trained_tokens"] for b in batches)], run.device)
    loss = _backward(run, batches, max(n_trained, 1))
    loss, real, computed, stops = distributed.reduce_step(world, run.trainable, [
        loss, sum(b["real_tokens"] for b in batches), sum(b["computed_tokens"] for b in batches), bool(stop)])
    run.scaler.unscale_(run.optimizer)  # fp16: the true gradients (inf where they overflowed), before clipping
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, run.hp.max_grad_norm))
    skipped = run.scaler.is_enabled() and not math.isfinite(grad_norm)  # fp16 overflow: the scaler skips this step
    if not (math.isfinite(loss) and (math.isfinite(grad_norm) or skipped)) or run.scaler.get_scale() < 1:
        raise JobError(f"training diverged at step {run.state.step + 1} (loss {loss}, gradient norm {grad_norm}): "
                       f"lower hyperparameters.learning_rate (now {run.hp.learning_rate:g}) and resubmit")
    lr = run.scheduler.get_last_lr()[0]
    run.scaler.step(run.optimizer)  # the optimizer's step, unless the gradients overflowed
    run.scaler.update()
    if not skipped:  # a skipped step leaves the learning rate where it was, as it leaves the weights
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    s = run.state
    s.step, s.real_tokens, s.computed_tokens, s.trained_tokens = (
        s.step + 1, s.real_tokens + int(real), s.computed_tokens + int(computed), s.trained_tokens + int(n_trained))
    s.skipped_steps += skipped
    seconds = max(time.monotonic() - started, 1e-9)
    return {"step": s.step, "epoch": s.epoch, "loss": loss, "learning_rate": lr, "grad_norm": grad_norm,
            "tokens_per_second": real / seconds, "real_tokens": int(real), "trained_tokens": int(n_trained),
            "gpu_utilization": gpu_utilization(run.device),
            **({"loss_scale": run.scaler.get_scale(), "skipped": skipped} if run.scaler.is_enabled() else {}),
            }, stops > 0


def evaluate(run: Run, sequences: list) -> float | None:
    """Mean loss over the trained tokens of `sequences` (every rank its share, batched as in training)."""
    if not sequences:
        return None
    mine, micro = sequences[run.world.rank::run.world.size], run.plan.micro_batch_size
    run.model.eval()
    total = count = 0.0
    with torch.no_grad(), autocast(run.device, run.compute_dtype):
        for i in range(0, len(mine), micro):
            batch = run.batch(mine[i:i + micro])
            total += float(run.loss_sum(batch))
            count += batch["trained_tokens"]
    run.model.train()
    total, count = distributed.sum_over_ranks(run.world, [total, count], run.device)
    return total / max(count, 1)


def train_loop(run: Run) -> None:
    """Steps until `plan.total_steps` (or early stopping); checkpoints by rank 0 every `checkpoint_steps` /
    `checkpoint_minutes`, no closer than their own cost allows (checkpoint_spacing), and when a rank was asked to stop
    (SIGTERM: Stopped is raised then; a stop request, the app's cancel: Cancelled)."""
    hp, s, plan = run.hp, run.state, run.plan
    last_checkpoint = time.monotonic()
    resumed_figures = {k: s.last_record[k] for k in ("loss", "learning_rate")} if s.last_record else {}  # app NOT NULLs
    run.progress({"stage": "training", "percent": 100.0 * s.step / plan.total_steps, "step": s.step,
                  "total_steps": plan.total_steps, "epoch": s.epoch, **resumed_figures})
    with stop_on_sigterm() as signalled:
        stop = StopAsked(signalled, run.checkpoint_dir)
        while s.step < plan.total_steps and s.stop_reason is None:
            s.epoch += s.next_start == 0
            order = epoch_order(len(run.data.train), hp.seed, s.epoch)
            while s.step < plan.total_steps:
                start = s.next_start
                batch = [run.data.train[i] for i in order[start:start + hp.batch_size]]
                record, stopping = train_step(run, batch, stop)
                stopping = stopping or (run.world.size == 1 and bool(stop))  # alone: a signal in the update counts
                s.next_start = start + hp.batch_size if start + hp.batch_size < len(order) else 0
                record_step(run, record, epoch_end=s.next_start == 0)
                now = time.monotonic()
                due = ((s.step % hp.checkpoint_steps == 0 or now - last_checkpoint >= 60 * hp.checkpoint_minutes)
                       and now - last_checkpoint >= checkpoint_spacing(run.checkpoints["last_seconds"]))
                more = s.step < plan.total_steps and s.stop_reason is None
                if run.checkpoint_dir is not None and run.world.main and (stopping or (due and more)):
                    write_checkpoint(run)
                    last_checkpoint = time.monotonic()
                if stopping:  # the checkpoint is on disk; stop_on_sigterm hands the signal on
                    if (reason := stop_reason(run.checkpoint_dir)) is not None:  # the app cancelled the job
                        raise Cancelled(f"{reason} at step {s.step} of {plan.total_steps}; a checkpoint was saved")
                    raise Stopped(f"the worker was asked to stop (SIGTERM) at step {s.step} of {plan.total_steps}; " + (
                        "a checkpoint was saved: resubmit the same job to resume" if run.checkpoint_dir
                        else "resubmit the job"))
                if s.next_start == 0:
                    break
        if s.stop_reason is None:
            s.stop_reason = "epochs" if plan.total_steps == plan.steps_per_epoch * hp.epochs else "max_steps"
        if run.data.validation and s.last_record and "validation_loss" not in s.last_record:  # max_steps, mid-epoch
            s.last_record["validation_loss"] = validate(run, s.last_record["loss"])


def record_step(run: Run, record: dict, epoch_end: bool) -> None:
    """A step done: at an epoch's end the validation (the best weights kept, early stopping decided); then the record
    into the log and the state, the log line, the progress event."""
    s, hp = run.state, run.hp
    if epoch_end and run.data.validation:
        record["validation_loss"] = validate(run, record["loss"])
        if 0 < hp.early_stopping_patience <= s.epoch - s.best_epoch:
            s.stop_reason = "early_stopping"
    s.first_loss = record["loss"] if s.first_loss is None else s.first_loss
    s.last_record = record
    run.log.append(record)
    log.info("step %d/%d epoch %d loss %.4f lr %.2e grad_norm %.3f %.0f tok/s", s.step, run.plan.total_steps,
             s.epoch, record["loss"], record["learning_rate"], record["grad_norm"], record["tokens_per_second"])
    run.progress({"stage": "training", "percent": 100.0 * s.step / run.plan.total_steps,
                  "total_steps": run.plan.total_steps, **record})


def validate(run: Run, train_loss: float) -> float:
    """The validation loss of the weights as they are; the lowest so far makes them the ones `save` delivers (a copy,
    on rank 0, in the dtype the adapter is saved in; in checkpoints too)."""
    s = run.state
    loss = evaluate(run, run.data.validation)
    s.validation_losses.append(loss)
    if s.best_validation_loss is None or loss < s.best_validation_loss:
        s.best_epoch, s.best_step, s.best_validation_loss, s.best_loss = s.epoch, s.step, loss, train_loss
        run.best = run.best_weights()
    return loss


def write_checkpoint(run: Run) -> None:
    started = time.monotonic()
    save_checkpoint(run.checkpoint_dir, run.state.step, capture(run))
    run.checkpoints["last_seconds"] = seconds = time.monotonic() - started
    run.checkpoints["seconds"] += seconds
    run.checkpoints["written"] += 1


# ---------------------------------------------------------------------------- save

def deliver_best(run: Run) -> dict:
    """The training record of the step whose weights are delivered: the best epoch's (its weights put back into the
    model, on rank 0, which saves), or the last step's."""
    s = run.state
    if s.best_step is None or s.best_step == s.step:
        return s.last_record
    if run.best is not None:
        set_peft_model_state_dict(run.model, run.best)
    log.info("delivering epoch %d (validation loss %.4f), the best of %d", s.best_epoch, s.best_validation_loss,
             s.epoch)
    return {"step": s.best_step, "epoch": s.best_epoch, "loss": s.best_loss, "validation_loss": s.best_validation_loss}


# ---------------------------------------------------------------------------- the recipe

@dataclass
class TrainResult:
    metrics: dict
    model: Any  # the PEFT model, still in memory when trained in this process (tests inspect it; the handler drops it)
    tokenizer: Any


def train_rank(data: Data, job: TrainJob, on_progress: ProgressFn | None = None,
               started: float | None = None) -> TrainResult:
    """setup → train → save → cleanup, in this process: one rank of the job (or all of it). `started`: when the
    job's training stage began (labelling included), on the monotonic clock every process shares."""
    started = started or time.monotonic()
    device, compute_dtype = select_precision(job.hp.compute_dtype)
    world = distributed.start(device)
    progress = on_progress or (lambda event: distributed.report("progress", event) if world.main else None)
    run = setup(data, job, world, device, compute_dtype, progress)
    loaded = time.monotonic()
    train_loop(run)
    seconds = {"load": loaded - started, "train": time.monotonic() - loaded}
    if job.checkpoint_dir is not None and world.main and run.resumed_from != run.state.step:
        write_checkpoint(run)  # a failed save resumes without training
    kept = deliver_best(run)
    progress({"stage": "saving", "validation_loss": kept.get("validation_loss")})
    peaks = distributed.gather_figure(world, peak_memory_gb(device), device)
    metrics = run_metrics(run, {**seconds, "wall": time.monotonic() - started}, kept, peaks)
    save(run, metrics)
    distributed.stop(world)  # cleanup; after a failure the process ends without it, its error reported first
    if job.checkpoint_dir is None and run.log.path is not None:
        shutil.rmtree(run.log.path.parent, ignore_errors=True)
    if world.size > 1 and world.main and job.quantized_cache and run.base_weights == "quantized while loading":
        keep_copy_after_training(run.model, job.base_path, compute_dtype, job.quantized_cache, job.trust_remote_code)
    return TrainResult(metrics, run.model, run.tokenizer)


def _rank_metrics(data: Data, job: TrainJob, started: float) -> dict:
    return train_rank(data, job, started=started).metrics


def train(conversations: list[dict], base_model: str | Path, output_dir: str | Path, hp: Hyperparameters,
          on_progress: ProgressFn | None = None, cache_dirs: list[Path] | None = None, trust_remote_code: bool = False,
          checkpoint_dir: str | Path | None = None, fingerprint: str = "", quantized_cache: Path | None = None,
          processes: int = 1) -> TrainResult:
    """Train a LoRA adapter on canonical conversations in `processes` ranks (one per GPU) and write it to `output_dir`.

    With `checkpoint_dir`, the labelled data and checkpoints (every `hp.checkpoint_steps` steps, `hp.checkpoint_minutes`
    minutes and on SIGTERM) are kept there, and training resumes from the newest valid checkpoint whose `fingerprint`
    (of the settings, data and base model) matches. With `quantized_cache`, the 4-bit base is kept there for later
    jobs. In more than one process the result holds the metrics only."""
    job = TrainJob(hp, str(base_model), resolve_base_model(str(base_model), cache_dirs or []), Path(output_dir),
                   Path(checkpoint_dir) if checkpoint_dir is not None else None, fingerprint, quantized_cache,
                   trust_remote_code)
    started = time.monotonic()
    data = prepare_data(conversations, job.base_path, hp, trust_remote_code, job.checkpoint_dir, fingerprint)
    if processes == 1:
        return train_rank(data, job, on_progress, started)
    return TrainResult(distributed.launch(processes, _rank_metrics, (data, job, started), on_progress), None, None)


# ---------------------------------------------------------------------------- command line

def _add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Hyperparameters field, its default and help taken from the model (the single source)."""
    for name, info in Hyperparameters.model_fields.items():
        if name == "base_model":
            continue
        flag, annotation = "--" + name.replace("_", "-"), str(info.annotation)
        if "bool" in annotation:  # true/false (and "auto" where the field takes it), checked by the model
            parser.add_argument(flag, default=None, help=f"{info.description} (default {str(info.default).lower()})")
        elif "list" in annotation:
            parser.add_argument(flag, nargs="+", default=None, help=info.description)
        else:
            kind = (str if "Literal" in annotation else float if "float" in annotation
                    else int if "int" in annotation else str)
            parser.add_argument(flag, type=kind, default=None, help=f"{info.description} (default {info.default})")


def _parser() -> argparse.ArgumentParser:
    default = lambda name: Hyperparameters.model_fields[name].default  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train an adapter outside RunPod")
    p_prev = sub.add_parser("preview", help="show exactly which tokens would be trained")
    for p, name in [(p_train, "--dataset"), (p_train, "--base-model"), (p_train, "--output"), (p_prev, "--dataset"),
                    (p_prev, "--base-model")]:
        p.add_argument(name, required=True)
    p_train.add_argument("--checkpoint-dir", default=None,
                         help="keep the labelled data and resumable checkpoints here, and resume from them")
    p_train.add_argument("--processes", type=int, default=None, help="training processes, one per GPU (data parallel; "
                         "default: every visible GPU, 1 without one; more than 1 on the CPU runs gloo, for tests)")
    _add_hyperparameter_flags(p_train)
    p_prev.add_argument("--max-seq-length", type=int, default=default("max_seq_length"))
    p_prev.add_argument("--limit", type=int, default=None)
    p_prev.add_argument("--json", action="store_true")
    p_est = sub.add_parser("estimate", help="GPU memory a job needs, from config.json alone")
    p_est.add_argument("--base-model", required=True,
                       help="model directory (config.json is enough) or a cached model id")
    for name in ("max_seq_length", "batch_size", "lora_rank"):
        p_est.add_argument("--" + name.replace("_", "-"), type=int, default=default(name))
    p_est.add_argument("--gpu-memory-gb", type=float, default=None, help="free GPU memory to fit into")
    p_est.add_argument("--gradient-checkpointing", default=default("gradient_checkpointing"),
                       help="true, false or auto (default: auto, decided from --gpu-memory-gb; on without it)")
    p_est.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "estimate":
            return estimate_command(args, config_source(args.base_model))
        if args.command == "preview":
            print_preview(preview(args.dataset, args.base_model, args.max_seq_length, args.limit), args.json)
            return 0
        hp = parse_hyperparameters({k: v for k, v in vars(args).items()
                                    if k in Hyperparameters.model_fields and v is not None})
        conversations, _ = load_dataset(args.dataset)
        fingerprint = job_fingerprint(hp, args.base_model, sha256_of(Path(args.dataset)))
        processes = args.processes or max(1, distributed.visible_gpus())
        result = train(conversations, args.base_model, args.output, hp, checkpoint_dir=args.checkpoint_dir,
                       fingerprint=fingerprint, processes=processes)
        print(json.dumps(result.metrics, indent=2))
        return 0
    except (JobError, DatasetError, SkipExample) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
