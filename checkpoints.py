"""Training checkpoints that survive a worker disappearing, and a stop request that writes one.

A checkpoint is a directory `checkpoint-<step>/state.pt` holding everything needed to continue
exactly where training stopped: the LoRA weights, the optimizer and scheduler states, rank 0's RNG
state, the data position (epoch and the next batch: an epoch's order follows from the seed), the
token counters and the figures the metrics need, plus a fingerprint of the job (settings, dataset, base model).
Written by rank 0 alone (every rank holds the same weights and optimizer state); any world size resumes it.
It is written into a fresh directory and renamed into place (files.atomic_dir), so a crash mid-write leaves
the previous one; the last two are kept. The per-step records are not in it: they are appended to the job's
`training_log.jsonl` as they are made (`TrainingLog`), which a resume cuts back to the checkpoint's step, so a
checkpoint costs the same at any step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from files import atomic_dir, atomic_file, private_dir
from job import JobError

# torch and peft are imported inside the functions that use them: the handler imports this module at its start (for
# the stop request), which takes about 2 s without them; torch, transformers, peft and bitsandbytes add about 6 s.

log = logging.getLogger(__name__)
KEEP = 2


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def save_checkpoint(directory: Path, step: int, state: dict) -> Path:
    """Write `state` as checkpoint-<step> atomically and keep the newest KEEP checkpoints."""
    import torch

    final = directory / f"checkpoint-{step}"
    try:
        private_dir(directory)
        for leftover in directory.glob("checkpoint-*.tmp-*"):  # what a killed worker was writing (one worker per job)
            shutil.rmtree(leftover, ignore_errors=True)
        with atomic_dir(final) as tmp, open(tmp / "state.pt", "wb") as f:  # a fresh directory: nothing in it to follow
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError, not OSError
        previous = _checkpoints(directory) if directory.is_dir() else []
        kept = f"checkpoint {previous[0].name} is intact" if previous else "no earlier checkpoint exists"
        raise JobError(f"could not write the checkpoint of step {step} ({getattr(exc, 'strerror', None) or exc}): free "
                       f"space on the volume and resubmit the job to resume; {kept}") from None
    for old in _checkpoints(directory)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return final


def load_latest_checkpoint(directory: Path, fingerprint: str, set_aside: bool = True) -> tuple[dict | None, list[str]]:
    """The newest checkpoint of this job that loads, and warnings about any set aside.

    A checkpoint that fails to load, or belongs to different settings or data, is renamed
    `<name>.bad` (kept for inspection, never used again) and the next older one is tried; with `set_aside`
    False (the other ranks of a job in several processes: rank 0 renames) it is only skipped.
    """
    import torch

    warnings: list[str] = []
    if not directory.is_dir():
        return None, warnings
    for path in _checkpoints(directory):
        reason = None
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if "state" not in state:
                reason = "it was written by an earlier version of the worker"
            elif state.get("fingerprint") != fingerprint:
                reason = "it was written for different settings, data or base model"
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
            reason = f"it could not be read ({type(exc).__name__})"
        if reason is None:
            return state, warnings
        if not set_aside:
            continue
        shutil.rmtree(path.with_name(path.name + ".bad"), ignore_errors=True)
        os.replace(path, path.with_name(path.name + ".bad"))
        warnings.append(f"checkpoint {path.name} was set aside because {reason}")
        log.warning(warnings[-1])
    return None, warnings


class Stopped(JobError):
    """SIGTERM ended the job (its message says where, and that a resubmission resumes it)."""


class Cancelled(Stopped):
    """The app cancelled the job (its job row says so): training stopped after a step, with a checkpoint."""


STOP_FILE = "stop-requested"  # in the checkpoint directory: every training process stops after its step


def request_stop(checkpoint_dir: Path, reason: str) -> None:
    """Ask the training processes (this one's trainer, or the ranks of a job in several processes, which see the same
    directory) to stop after the step under way, write a checkpoint and raise Cancelled with `reason`."""
    private_dir(checkpoint_dir)
    (checkpoint_dir / STOP_FILE).write_text(reason)


def stop_reason(checkpoint_dir: Path | None) -> str | None:
    """The reason a stop was requested with, or None."""
    try:
        return (checkpoint_dir / STOP_FILE).read_text() if checkpoint_dir is not None else None
    except FileNotFoundError:
        return None


def clear_stop_request(checkpoint_dir: Path) -> None:
    (checkpoint_dir / STOP_FILE).unlink(missing_ok=True)


class StopAsked:
    """True once SIGTERM arrived (`signalled`, a StopRequested) or a stop was requested in the checkpoint directory
    (request_stop: the app cancelled the job); the trainer reads it after each step's backward."""

    def __init__(self, signalled, checkpoint_dir: Path | None):
        self.signalled, self.checkpoint_dir = signalled, checkpoint_dir

    def __bool__(self) -> bool:
        return bool(self.signalled) or stop_reason(self.checkpoint_dir) is not None


class StopRequested:
    """What SIGTERM did: `signal` once it arrived; while training (`checkpointing`) the trainer checks it after each
    step, to write a checkpoint first; elsewhere the signal raised Stopped where the main thread was."""

    def __init__(self, previous=None):
        self.signal: int | None = None
        self.previous, self.checkpointing = previous, False

    def __bool__(self) -> bool:
        return self.signal is not None


_job_stop: StopRequested | None = None  # the outermost block's: one per job, on the main thread


@contextmanager
def stop_on_sigterm(checkpointing: bool = True):
    """SIGTERM during the block ends the job promptly. The outermost block (the whole job: the handler's) installs
    the handler; a nested one (training, `checkpointing`) turns it into a flag the trainer checks after each step.
    Outside training it raises Stopped at once, wherever the main thread is (a download, a model load). The handler
    that was there before is handed the signal: at once when it is a function (the runpod SDK's, which stops the
    worker taking jobs), at the block's end when it is the default (the process then exits, after the checkpoint).
    Yields the StopRequested; in other threads signals cannot be caught, and the flag never rises."""
    global _job_stop
    if _job_stop is not None:
        outer, _job_stop.checkpointing = _job_stop.checkpointing, checkpointing
        try:
            yield _job_stop
        finally:
            _job_stop.checkpointing = outer
        return
    if threading.current_thread() is not threading.main_thread():
        yield StopRequested()
        return
    flag = _job_stop = StopRequested(signal.getsignal(signal.SIGTERM))
    flag.checkpointing = checkpointing

    def request_stop(signum, frame):
        first = flag.signal is None
        flag.signal = signum
        if first and callable(flag.previous):
            flag.previous(signum, frame)
        if not flag.checkpointing:
            raise Stopped("the worker was asked to stop (SIGTERM); resubmit the job")
        log.warning("SIGTERM received: stopping after this step with a checkpoint")

    signal.signal(signal.SIGTERM, request_stop)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, flag.previous)
        _job_stop = None
        if flag and flag.previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGTERM)


# Periodic checkpoints take at most this share of the training time: the next is due no sooner than the last one's
# write time x (1 - share) / share after it (a 7B job's 250 MB fsynced to a network volume every step would otherwise
# cost more than the steps). SIGTERM's, a cancel's and the final checkpoint are never held back.
CHECKPOINT_TIME_SHARE = 0.1


def checkpoint_spacing(last_write_seconds: float) -> float:
    """The least seconds of training between the end of a periodic checkpoint and the next one."""
    return last_write_seconds * (1 - CHECKPOINT_TIME_SHARE) / CHECKPOINT_TIME_SHARE


# ---------------------------------------------------------------------------- the per-step log

class TrainingLog:
    """The per-step records of a job, one JSON line each, appended as they are made (by rank 0; `path` None on the
    other ranks) to a file beside the checkpoints. `start` cuts it back to the step a job resumes from (a crash may
    have left later lines), or empties it for a job that starts from scratch. Memory and checkpoints hold none of it."""

    def __init__(self, path: Path | None):
        self.path = path

    def start(self, step: int) -> str | None:
        """Keep the records up to `step` (0: none); a warning when some of them are missing."""
        if self.path is None:
            return None
        private_dir(self.path.parent)
        kept, last = [], 0
        if step and self.path.is_file():
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by a crash
                        break
                    if record.get("step", step + 1) > step:
                        break
                    kept.append(line)
                    last = record["step"]
        with atomic_file(self.path) as f:
            f.write("".join(kept).encode())
        if last < step:
            return (f"the training log of this job lost the records of steps {last + 1} to {step} (training_log.jsonl "
                    "and the loss chart start later); training itself resumed whole")
        return None

    def append(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------- what a checkpoint holds

@dataclass
class TrainState:
    """What a checkpoint holds besides the weights, optimizer, schedule and random state; saved and restored whole.
    Its size does not grow with the steps: the per-step records are in the TrainingLog."""
    step: int = 0
    epoch: int = 0
    next_start: int = 0  # where in the epoch's order the next step starts (0: a new epoch)
    first_loss: float | None = None
    last_record: dict = field(default_factory=dict)  # the newest step's record
    validation_losses: list = field(default_factory=list)  # each validation's, in order (one an epoch)
    real_tokens: int = 0
    computed_tokens: int = 0
    trained_tokens: int = 0
    recompute_from: int | None = None  # "auto" turned recomputation on at this step (out of memory without it)
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed, skipped by the loss scaler
    best_epoch: int | None = None  # the epoch whose end had the lowest validation loss so far (its weights: Run.best)
    best_step: int | None = None
    best_validation_loss: float | None = None
    best_loss: float | None = None  # the training loss of the best epoch's last step
    stop_reason: str | None = None  # why training ended: "epochs", "max_steps" or "early_stopping"


def capture(run) -> dict:
    """A checkpoint of `run` (a train_lora.Run): its TrainState, the LoRA weights (and the best epoch's, when they are
    not the current ones), the optimizer and schedule, the random state; `restore` puts it back whole."""
    import torch
    from peft import get_peft_model_state_dict

    return {"fingerprint": run.job.fingerprint, "state": asdict(run.state),
            "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(run.model).items()},
            "best": run.best if run.state.best_step != run.state.step else None,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if run.device == "cuda" else None}


def restore(run, saved: dict) -> None:
    import torch
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(run.model, saved["lora"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    # fp16's loss scale goes on as it was
    if saved.get("scaler") and run.scaler is not None and run.scaler.is_enabled():
        run.scaler.load_state_dict(saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.best = saved.get("best")
    if run.best is None and run.state.best_step == run.state.step and run.state.best_step is not None:
        run.best = run.best_weights()  # the checkpoint was written at the best epoch's end: its weights are the best
    if run.world.main:  # the other ranks' dropout draws from their own seeds
        torch.set_rng_state(saved["rng_torch"])
        if run.device == "cuda" and saved["rng_cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"])
    run.resumed_from = run.state.step
    log.info("resumed from the checkpoint of step %d (epoch %d)", run.state.step, run.state.epoch)
