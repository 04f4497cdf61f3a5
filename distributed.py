"""Data-parallel training over the worker's GPUs: every torch.distributed call the trainer makes is here.

`launch` starts one process per GPU with PyTorch's own elastic launcher (what `torchrun --standalone`
runs), on this one node, and waits for them. Each process (`rank`) loads the 4-bit base on its GPU and
trains the same LoRA on its share of every global batch; after each step's backward, `reduce_step`
sums the LoRA gradients over the ranks (one all-reduce, with the figures every rank needs), so every
rank takes the same optimizer step. NCCL on GPUs, gloo on the CPU (the tests).

Rank 0 alone reports progress (through a queue to the launching process) and writes checkpoints, the
adapter and the result. A rank that fails ends the job: the launcher stops the others (SIGTERM, then
SIGKILL after torch's own 30 s) and raises JobError with the failed rank's own message; SIGTERM sent to
the launching process reaches every rank, which stop together after the same step (SIGKILL after
`SHUTDOWN_TIMEOUT_S`). Each rank touches a heartbeat file from a thread of its own; a rank whose every
thread stopped (SIGSTOP, a call that never releases the GIL) is killed after `HEARTBEAT_TIMEOUT_S` and
named, where its peers would wait in the all-reduce for `COLLECTIVE_TIMEOUT`.

Everything listens on loopback only: the launcher's store (rendezvous, then the ranks' own) is bound to
127.0.0.1, and gloo and NCCL bootstrap over `lo` (torch's own store listens on every interface, and gloo
and NCCL on the one the hostname resolves to: eth0 in a container).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from checkpoints import Stopped, stop_on_sigterm
from job import JobError

# torch is imported inside the functions that use it: the handler imports this module at its start (for
# shared_memory_note and visible_gpus), which takes about 2 s without torch; torch, transformers, peft and bitsandbytes
# add about 6 s, paid by the first job instead.

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 60  # after SIGTERM: how long the ranks get to finish the step and checkpoint before SIGKILL
# a collective waiting longer than this fails the job (a rank stuck, still beating)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
HEARTBEAT_INTERVAL_S = 2  # how often each rank's heartbeat thread touches its file
HEARTBEAT_TIMEOUT_S = 60  # a rank whose heartbeat is older than this is stopped or frozen: killed, and named


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


NCCL_SHM_MIN_BYTES = 1 << 30  # below this, NCCL's shared-memory transport fails between ranks (Docker's default: 64 MB)
_shm_disabled_here = False  # NCCL_SHM_DISABLE was set by shared_memory_note, not by the deployment


def shared_memory_note(processes: int, shm: str = "/dev/shm") -> str | None:
    """With several ranks on a node NCCL moves data through /dev/shm; a small one (Docker's 64 MB default) makes it fail
    mid-job. Then NCCL_SHM_DISABLE=1 is set for the ranks (they talk over sockets or P2P instead) and the note says
    so."""
    global _shm_disabled_here
    if processes < 2 or (os.environ.get("NCCL_SHM_DISABLE") and not _shm_disabled_here):  # the deployment's choice
        return None
    try:
        size = shutil.disk_usage(shm).total
    except OSError:
        return None
    if size >= NCCL_SHM_MIN_BYTES:
        return None
    os.environ["NCCL_SHM_DISABLE"], _shm_disabled_here = "1", True
    return (f"{shm} holds only {size / 1024**2:.0f} MB, too little for NCCL's shared-memory transport between the "
            f"{processes} training processes: the worker set NCCL_SHM_DISABLE=1 (slower transfers between GPUs). "
            "Give the container at least 1 GB of shared memory (docker run --shm-size=1g) or set NCCL_SHM_DISABLE=1 "
            "yourself")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start(device: str) -> World:
    """Join the job's process group when the launcher started this process (WORLD_SIZE > 1); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size())


def stop(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def sum_over_ranks(world: World, values: list[float], device: str = "cpu") -> list[float]:
    """Each value summed over the ranks (float64: token counts stay exact)."""
    if world.size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def reduce_step(world: World, params: list, figures: list[float]) -> list[float]:
    """Sum the gradients of `params` over the ranks in place, and `figures` with them (one all-reduce);
    returns the summed figures. A rank with no micro-batch in this step contributes zeros."""
    if world.size == 1:
        return list(figures)
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]
                     + [torch.tensor(figures, dtype=torch.float32, device=grads[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def gather_figure(world: World, value: float, device: str = "cpu") -> list[float]:
    """One figure from every rank, in rank order (peak memory per GPU)."""
    values = [0.0] * world.size
    values[world.rank] = value
    return sum_over_ranks(world, values, device)


# ---------------------------------------------------------------------------- the launching process

_events = None  # in a rank: the queue to the launching process


def report(kind: str, payload) -> None:
    """Send an event to the launching process (from a launched rank); nothing in a single process."""
    if _events is not None:
        _events.put((kind, payload))


def _heartbeat(path: Path) -> None:
    """Write this process's pid to `path`, then touch it every HEARTBEAT_INTERVAL_S from a daemon thread: it ages when
    every thread of the process stops (SIGSTOP, a frozen cgroup, a call that holds the GIL), not when the main thread
    waits in a collective (that releases the GIL)."""
    path.write_text(str(os.getpid()))

    def beat():
        while True:
            time.sleep(HEARTBEAT_INTERVAL_S)
            os.utime(path)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def _rank_main(entrypoint, events, heartbeats, args):
    """What each launched process runs: `entrypoint(*args)` with its failure sent to the launcher, in words."""
    global _events
    _events = events
    rank = int(os.environ.get("RANK", "0"))
    _heartbeat(Path(heartbeats) / str(rank))
    # One node: gloo and NCCL bootstrap over loopback, whatever interface the deployment or the hostname points at
    # (NCCL moves the data itself through P2P or shared memory; over lo as well where both are unavailable).
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = "lo"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,  # one rank tells the steps
                        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s %(message)s")
    with stop_on_sigterm(checkpointing=False):  # outside training SIGTERM ends the rank at once
        try:
            return entrypoint(*args)
        except JobError as exc:
            report("error", (rank, type(exc).__name__, str(exc)))
            raise
        except BaseException as exc:
            report("error", (rank, type(exc).__name__, f"{type(exc).__name__}: {exc}"))
            time.sleep(2)  # a peer that died first (a lost connection is the symptom here) is seen to fail first
            raise


def _watch_heartbeats(heartbeats: Path, done: threading.Event, hung: list) -> None:
    """Until `done`: once any running rank's heartbeat is older than HEARTBEAT_TIMEOUT_S, kill the one silent longest
    (SIGKILL: a stopped process runs no handler) and note (rank, seconds). The launcher then sees a failed rank and
    stops the others, whose all-reduce fails as the killed rank's sockets close."""
    while not done.wait(HEARTBEAT_INTERVAL_S):
        silent = []
        for path in heartbeats.iterdir():
            try:
                age, pid = time.time() - path.stat().st_mtime, int(path.read_text())
            except (OSError, ValueError):  # being written
                continue
            if age > HEARTBEAT_TIMEOUT_S and _runs(pid):
                silent.append((age, int(path.name), pid))
        if silent:
            age, rank, pid = max(silent)
            hung.append((rank, round(age)))
            os.kill(pid, signal.SIGKILL)
            return


def _runs(pid: int) -> bool:
    """Whether `pid` has not exited (a rank that exited stays a zombie until the launcher reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _loopback_store():
    """The launcher's TCPStore on a socket bound to 127.0.0.1 (torch's own binds every interface). `multi_tenant`: the
    static rendezvous's TCPStore on the same port is this one, and the ranks connect to it as the agent's store."""
    from torch.distributed import TCPStore

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    return TCPStore("127.0.0.1", port, is_master=True, master_listen_fd=listener.detach(), multi_tenant=True)


def launch(processes: int, entrypoint, args: tuple, on_event=None):
    """Run `entrypoint(*args)` in `processes` ranks on this node; returns rank 0's return value.

    `on_event(payload)` receives what rank 0 reports as "progress", in the launching process (from a thread).
    Raises JobError naming the rank that failed first and why; Stopped when SIGTERM stopped the ranks."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    # A SimpleQueue writes in the caller's thread: a rank's last message is sent before it exits (a Queue's feeder
    # thread can die with the rank holding the queue's lock, and the launcher then hangs at exit). Only the ranks write.
    events, done = multiprocessing.get_context("spawn").SimpleQueue(), threading.Event()
    errors: list[tuple] = []
    # One node, one store: the static rendezvous (no rendezvous round, no state unpickled from the store) on our store
    store = _loopback_store()
    relayer = threading.Thread(target=_relay, args=(events, done, errors, on_event), name="rank-events", daemon=True)
    relayer.start()
    heartbeats, hung = Path(tempfile.mkdtemp(prefix="rank-heartbeats-")), []
    watchdog = threading.Thread(target=_watch_heartbeats, args=(heartbeats, done, hung), name="rank-heartbeats",
                                daemon=True)
    watchdog.start()
    config = _launch_config(processes, store.port)
    handlers = _launcher_signals(config)
    log.info("training in %d processes (torch.distributed, %s)", processes, "nccl" if visible_gpus() else "gloo")
    failure = None
    try:
        returned = elastic_launch(config, _rank_main)(entrypoint, events, str(heartbeats), args)
    except (SignalException, ChildFailedError) as exc:
        failure = exc
    finally:
        _restore_signals(handlers)
        done.set()
        relayer.join(timeout=5)  # every message the ranks sent, read
        watchdog.join()
        shutil.rmtree(heartbeats, ignore_errors=True)
    if failure is None:
        return returned[0]
    if isinstance(failure, ChildFailedError):
        raise JobError(_failure_message(processes, errors, failure, hung))
    _stopped_by_signal(failure.sigval, handlers, errors)


def _relay(events, done: threading.Event, errors: list, on_event) -> None:
    """Until `done` and the queue is empty: the ranks' errors into `errors`, rank 0's progress to `on_event`."""
    while not (done.is_set() and events.empty()):
        if events.empty():
            time.sleep(0.05)
            continue
        kind, payload = events.get()
        if kind == "error":
            errors.append(payload)
        elif kind == "progress" and on_event is not None:
            try:
                on_event(payload)
            except Exception:  # noqa: BLE001 - a failed progress report must not stop training
                log.warning("a progress update failed", exc_info=True)


def _launch_config(processes: int, store_port: int):
    """torch's elastic launcher on this node: `processes` spawned ranks, no restart, the static rendezvous on the
    launcher's store at 127.0.0.1:`store_port`."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, rdzv_backend="static",
                        rdzv_endpoint=f"127.0.0.1:{store_port}", rdzv_configs={"rank": 0}, run_id=str(uuid.uuid4()),
                        max_restarts=0, monitor_interval=0.5, start_method="spawn", shutdown_timeout=SHUTDOWN_TIMEOUT_S)


def _launcher_signals(config) -> dict:
    """The handlers there are now of the signals the launcher handles: it replaces them for good, so that they are
    put back after it (`_restore_signals`)."""
    signals = (getattr(signal, name.strip(), None) for name in config.signals_to_handle.split(","))
    return {sig: signal.getsignal(sig) for sig in signals if sig is not None}


def _restore_signals(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def _stopped_by_signal(sigval, handlers: dict, errors: list[tuple]):
    """SIGTERM stopped the ranks: the launcher handed it to every rank and waited for them; the handler there was
    before hears of it too. Raises Stopped, with a rank's own words when one said why."""
    previous = handlers.get(sigval)
    if callable(previous):
        try:
            previous(sigval, None)
        except Stopped:
            pass
    stopped = [e for e in errors if e[1] == "Stopped"]
    raise Stopped(stopped[0][2] if stopped else "the worker was asked to stop (SIGTERM); resubmit the job")


def _failure_message(processes: int, errors: list[tuple], exc, hung: list[tuple]) -> str:
    """The first failure, in the failed rank's words: its JobError, its exception, or the signal that killed it; a rank
    the heartbeat watchdog killed is the cause whatever its peers then said."""
    if hung:
        rank, seconds = hung[0]
        return (f"training process {rank} of {processes} stopped responding (no heartbeat for {seconds} s: the "
                "process was stopped or frozen); it was killed and the others were stopped. Resubmit the job: it "
                "resumes from its last checkpoint")
    rank, failure = exc.get_first_failure()
    killed = [(r, f) for r, f in sorted(exc.failures.items()) if f.exitcode == -signal.SIGKILL]
    if killed and not any(e[1] in ("JobError", "Stopped", "Cancelled") for e in errors):
        rank, failure = killed[0]  # the rank that was killed, not one that then lost its connection to it
    own = [e for e in errors if e[0] == rank] or [e for e in errors if e[1] == "JobError"]
    if own and own[0][1] in ("JobError", "Stopped", "Cancelled"):
        return own[0][2] if processes == 1 else f"{own[0][2]} (training process {own[0][0]} of {processes})"
    if failure.exitcode < 0:
        cause = f"was killed by {failure.signal_name()}"
        hint = " (SIGKILL is what the kernel's out-of-memory killer sends: the worker's RAM may be too small)" \
            if failure.signal_name() == "SIGKILL" else ""
    else:
        cause = f"failed: {own[0][2] if own else failure.message or f'exit code {failure.exitcode}'}"
        hint = ""
    return (f"training process {rank} of {processes} {cause}{hint}; the others were stopped. Resubmit the job: it "
            "resumes from its last checkpoint")
