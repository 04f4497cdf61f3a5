"""The job's stages as the app sees them: the progress updates it polls, sent in order from one thread, and the
stage each failure is labelled with (`in_stage`).

RunPod's own `progress_update` starts a thread per update, so two updates close together can arrive in either order.
Here one sender thread per job takes the updates from a queue and posts them one after another (`compat.post_progress`,
a synchronous send); the job only puts them on the queue, so a slow webhook never slows training. The job's end
(`ProgressReporter.close`) waits a few seconds at most for the updates still queued, then drops them. An update
whose send outlasts SEND_TIMEOUT_S (a webhook that hangs) leaves only the newest of those queued behind it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from contextlib import contextmanager

from app_row import JobRow
from checkpoints import Cancelled
from compat import post_progress
from dataset_loader import DatasetError
from files import volume_fault
from job import JobError, redact_text

log = logging.getLogger("worker")

# Overall progress (0..100) at the start of each stage, in the order they run; a stage that reports a
# percent (the model download, training) fills the span up to the next one.
STAGE_START = {"downloading": 1, "loading_data": 3, "downloading_model": 5, "loading_model": 9, "training": 10,
               "saving": 95, "uploading": 97}
_NEXT_START = dict(zip(STAGE_START, [*list(STAGE_START.values())[1:], 100]))

FLUSH_TIMEOUT_S = 5.0  # at the job's end, the longest wait for the updates still queued (the result goes out after)
SEND_TIMEOUT_S = 30.0  # one update's longest wait for the webhook; after it the backlog is cut to its newest update


class ProgressReporter:
    """Sends what the app polls (`progress`, `current_epoch`, `current_step`, `total_steps`, `stage`,
    `metrics`) at each stage change, at each epoch's validation loss, and at most every `interval_s`
    seconds in between.

    The app inserts a `metrics_points` row for each update that has `metrics`, with `training_loss`,
    `learning_rate`, the epoch and the step in NOT NULL columns: updates before training carry no
    `metrics`, and from the start of training on an update is sent only once they all hold numbers (the
    first step's end); later updates carry the last loss and learning rate, and the other figures only
    in the update that measured them (a validation loss is not repeated as if measured again). `total_steps` is ours
    (the app's own count ignores packing). Updates go to RUNPOD_WEBHOOK_POST_OUTPUT from one sender thread, in the
    order they were made; where that is unset (a local run) there is nobody to tell, so nothing is sent.
    """

    METRICS = {"training_loss": "loss", "validation_loss": "validation_loss", "learning_rate": "learning_rate",
               "throughput": "tokens_per_second", "gpu_utilization": "gpu_utilization", "gradient_norm": "grad_norm"}
    TRAINING_STAGES = ("training", "saving", "uploading")
    CARRIED = {"training_loss", "learning_rate"}  # NOT NULL in the app's metrics_points: the last values, always

    def __init__(self, job: dict, enabled: bool, interval_s: float = 10.0):
        self.job, self.enabled, self.interval_s = job, enabled, interval_s
        self.on_event = lambda: None  # e.g. the job lock's heartbeat
        self.row: JobRow | None = None  # the app's job row (pipeline flow): every step's figures, the same updates
        self.stage = None  # the stage the job is in (failures are labelled with it)
        self.sent_stage, self.last_sent = None, 0.0
        self.carried: dict = {}
        self.payload = {"progress": 0.0, "current_epoch": 0, "current_step": 0, "total_steps": None, "stage": None}
        self._outbox: queue.Queue = queue.Queue()  # the sender's payloads, in order; None stops it
        self._abandoned = threading.Event()  # set when close() gave up: the sender drops what is left
        self._sender: threading.Thread | None = None
        self._sender_lock = threading.Lock()  # the model download's watcher thread reports too

    def __call__(self, event: dict) -> None:
        self.on_event()
        stage = self.stage = event.get("stage", self.stage)
        if self.row is not None:
            self.row.metrics(event)
            # in training the trainer stops after its step, checkpointed; elsewhere at the next event on the job's own
            # thread (the model download reports from a watcher thread, which must live on)
            if self.row.stopped_by and stage != "training" and threading.current_thread() is threading.main_thread():
                raise Cancelled(stopped_by_app(self.row))
        start, end = STAGE_START.get(stage, 0), _NEXT_START.get(stage, 0)
        metrics = {name: event[key] for name, key in self.METRICS.items()  # no inf (an fp16 step's skipped gradients)
                   if event.get(key) is not None and math.isfinite(event[key])}
        self.carried.update({k: v for k, v in metrics.items() if k in self.CARRIED})
        self.payload = {
            "progress": round(start + (end - start) * event["percent"] / 100 if "percent" in event else start, 1),
            "current_epoch": event.get("epoch", self.payload["current_epoch"]),
            "current_step": event.get("step", self.payload["current_step"]),
            "total_steps": event.get("total_steps", self.payload["total_steps"]),
            "stage": stage,
            # the app inserts a metrics row for every update that has `metrics`: none before the first step;
            # a figure measured once (a validation loss, a step's throughput) is sent with that update only
            **({"metrics": {**self.carried, **metrics}} if self.carried or metrics else {}),
        }
        if stage in self.TRAINING_STAGES and not self.CARRIED <= self.carried.keys():
            return  # no step has ended yet: the app could not store this update
        now = time.monotonic()
        if stage != self.sent_stage or "validation_loss" in metrics or now - self.last_sent >= self.interval_s:
            self.sent_stage, self.last_sent = stage, now
            log.info("progress %s %.1f%% step %s", stage, self.payload["progress"], self.payload["current_step"])
            if self.row is not None:
                self.row.progress(self.payload)
            if self.enabled:
                self._send(self.payload)

    def _send(self, payload: dict) -> None:
        """Queue one update for the sender thread (started with the first); returns at once."""
        with self._sender_lock:
            if self._sender is None:
                # its own queue and flag: a sender that outlived close() drops what was left in the old ones
                self._outbox, self._abandoned = queue.Queue(), threading.Event()
                self._sender = threading.Thread(target=self._send_in_order, args=(self._outbox, self._abandoned),
                                                name="progress-sender", daemon=True)
                self._sender.start()
            self._outbox.put(payload)

    def _send_in_order(self, outbox: queue.Queue, abandoned: threading.Event) -> None:
        while (payload := outbox.get()) is not None and not abandoned.is_set():
            try:
                sent = post_progress(self.job, payload, timeout_s=SEND_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - one lost update must not stop the ones after it
                log.warning("a progress update could not be sent: %s", redact_text(str(exc)))
                continue
            if not sent:
                _keep_newest(outbox)

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send the updates still queued, waiting `timeout_s` at most, and stop the sender thread (a later update
        starts another). Updates still queued then are dropped: none is sent after the job's result."""
        with self._sender_lock:
            sender, self._sender = self._sender, None
            if sender is None:
                return
            self._outbox.put(None)
        sender.join(timeout_s)
        if sender.is_alive():
            self._abandoned.set()
            log.warning("progress updates still unsent after %.0f s (a slow webhook): the job returns without them",
                        timeout_s)


def _keep_newest(outbox: queue.Queue) -> None:
    """After a send that outlasted SEND_TIMEOUT_S: the updates queued behind it are cut to the newest (and the
    sender's stop, if it was asked for)."""
    waiting = []
    while True:
        try:
            waiting.append(outbox.get_nowait())
        except queue.Empty:
            break
    updates = [w for w in waiting if w is not None]
    for kept in updates[-1:] + [None] * (None in waiting):
        outbox.put(kept)
    if len(updates) > 1:
        log.warning("a progress update took over %.0f s (a slow webhook): %d queued updates were dropped, the newest "
                    "is sent", SEND_TIMEOUT_S, len(updates) - 1)


def stopped_by_app(row: JobRow) -> str:
    what = "the user cancelled it" if row.stopped_by == "cancelled" else f"its status became {row.stopped_by!r}"
    return f"the app ended this job ({what}; {row.table} id={row.job_id})"


@contextmanager
def in_stage(name: str, progress: ProgressReporter | None = None, announce: bool = True):
    """Enter a stage (announced to the app unless `announce` is false: the checks that run before the
    dataset's download); label the failures raised inside it with its name."""
    if progress and announce:
        progress({"stage": name})
    elif progress:
        progress.stage = name
    try:
        yield
    except JobError as exc:
        exc.stage = exc.stage or name
        raise
    except DatasetError as exc:
        raise JobError(str(exc), stage=name) from None
    except OSError as exc:
        if fault := volume_fault(exc):
            raise JobError(fault, stage=name) from None
        raise


@contextmanager
def timed(seconds: dict, name: str):
    """`seconds[name]`: how long the block took, whether it ended or raised."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        seconds[name] = time.monotonic() - t0
