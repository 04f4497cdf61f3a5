"""How a job will train: what it is given (`TrainJob`, the same in every rank) and what is decided once from the data,
the settings, the memory estimate and the ranks (`Plan`: micro-batch, accumulation, recomputation, steps, warmup,
attention, schedule), logged and saved with the adapter."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import distributed
from architecture import load_config, meta_model, token_mixers
from compat import supports_flex_attention
from device import select_attention
from job import MAX_STEPS, Hyperparameters, JobError
from labelled_data import Data


@dataclass(frozen=True)
class TrainJob:
    """What a training run is given, the same in every rank."""
    hp: Hyperparameters
    base_model: str  # as the job named it (recorded in training_config.json)
    base_path: Path  # its directory
    output_dir: Path  # where the adapter is written
    checkpoint_dir: Path | None = None  # the labelled data and checkpoints, resumed from when they match
    fingerprint: str = ""  # of the settings, data and base model: which checkpoints belong to this job
    quantized_cache: Path | None = None  # where the 4-bit base is kept for later jobs
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Plan:
    """How the job trains, decided once from the data, the settings, the estimate and the ranks (logged, and saved with
    the adapter). Recomputation changes only through `recompute_from`, which makes a new plan."""
    world_size: int
    micro_batch_size: int
    accumulation_steps: int  # micro-batches per rank per optimizer step
    recompute: bool  # gradient checkpointing: activations recomputed in backward
    recompute_reason: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    attention: str
    schedule: str = "cosine"  # the learning rate's, after warmup (transformers.get_scheduler)


def agree_on_estimate(estimate, hp: Hyperparameters, world: distributed.World, device: str):
    """One estimate for every rank: the smallest micro-batch any GPU fits, recomputation if any needs it."""
    if world.size == 1:
        return estimate
    micro = int(min(distributed.gather_figure(world, estimate.micro_batch_size, device)))
    recompute = max(distributed.gather_figure(world, float(estimate.gradient_checkpointing), device)) > 0
    return dataclasses.replace(estimate, micro_batch_size=micro, gradient_checkpointing=recompute,
                               gradient_accumulation_steps=math.ceil(math.ceil(hp.batch_size / world.size) / micro))


def make_plan(data: Data, hp: Hyperparameters, estimate, world_size: int, device: str, base_path: Path) -> Plan:
    steps_per_epoch = math.ceil(len(data.train) / hp.batch_size)
    total = min(steps_per_epoch * hp.epochs, hp.max_steps or steps_per_epoch * hp.epochs)
    if total > MAX_STEPS:
        raise JobError(f"the job would take {total:,} optimizer steps ({len(data.train):,} sequences at batch_size "
                       f"{hp.batch_size} is {steps_per_epoch:,} an epoch, x {hp.epochs} epochs), more than the "
                       f"{MAX_STEPS:,} a job may take: raise hyperparameters.batch_size, lower epochs, or set "
                       "max_steps")
    # flex attention where transformers has it for the architecture, not beside linear-attention layers
    architecture = meta_model(load_config(base_path))
    flex = supports_flex_attention(type(architecture)) and not token_mixers(architecture)
    recompute = estimate.gradient_checkpointing
    reason = ("hyperparameters.gradient_checkpointing" if hp.gradient_checkpointing != "auto" else
              "auto: the micro-batch fits only with it" if recompute else "auto: the micro-batch fits without it")
    warmup = hp.warmup_steps if hp.warmup_steps is not None else math.ceil(hp.warmup_ratio * total)
    return Plan(world_size, estimate.micro_batch_size, estimate.gradient_accumulation_steps, recompute, reason,
                steps_per_epoch, total, warmup, select_attention(device, estimate.micro_batch_size, data.packing, flex))


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The order of the sequences in `epoch`: a shuffle that depends on the seed and epoch alone (any world size)."""
    order = list(range(size))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
