"""Data-parallel training in real torch.distributed processes (PyTorch's elastic launcher, gloo on the CPU):
two ranks train what one does, only rank 0 writes, checkpoints move between world sizes, nothing listens beyond
loopback, and a failing, killed or stopped rank ends the job in bounded time, named, with nothing left running."""

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import handler
from checkpoints import load_latest_checkpoint, request_stop
from conftest import ROOT, SAMPLE, running_worker, runsync
from dataset_loader import load_dataset
from job import Hyperparameters, JobError
from settings import WorkerSettings
from train_lora import train

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

ARGS = ["--max-seq-length", "256", "--lora-rank", "4", "--lora-dropout", "0", "--packing", "false", "--batch-size", "3",
        "--learning-rate", "1e-3", "--adapter-dtype", "float32", "--warmup-steps", "1"]

# Logs each write (a file opened for writing, a directory made, a rename) a launched rank makes under WATCH, to
# <WATCH_LOG>/rank-<RANK>: a Python audit hook, loaded into every process by sitecustomize. With FAIL_RANK, that
# rank's first read of a file named FAIL_ON fails as a volume's I/O error would.
AUDIT = """
import os, sys
WATCH, LOG = os.environ.get("WATCH"), os.environ.get("WATCH_LOG")
def hook(event, args):
    if not WATCH or event not in ("open", "os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
        return
    RANK = os.environ.get("RANK")  # set in a launched process once it runs, after this file loaded
    if RANK is None:
        return
    path = str(args[0]) if args else ""
    if event == "open" and RANK == os.environ.get("FAIL_RANK") and path.endswith(os.environ.get("FAIL_ON", "//")):
        raise OSError(5, "Input/output error (injected by the test)", path)
    writes = event != "open" or (args[1] is not None and any(m in str(args[1]) for m in "wax+")) or (
        isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if writes and path.startswith(WATCH):
        with open(os.path.join(LOG, "rank-" + RANK), "a") as f:
            f.write(event + " " + path + "\\n")
sys.addaudithook(hook)
"""


def cli(tmp_path, name, processes, *extra, env=None, **popen):
    command = [sys.executable, "train_lora.py", "train", "--dataset", str(SAMPLE), "--output", str(tmp_path / name),
               "--processes", str(processes), *ARGS, *extra]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def losses(adapter: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (adapter / "training_log.jsonl").read_text().splitlines()]


def children(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def running(pids: list[int], grace_s: float = 5) -> list[int]:
    """Those of `pids` still running after `grace_s` (an exited child whose parent is gone may stay a zombie until
    the container's init reaps it: it runs nothing)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_qwen2):
    """The reference: one process, 8 steps of 3 sequences, a validation share."""
    tmp = tmp_path_factory.mktemp("one")
    metrics = finished(cli(tmp, "adapter", 1, "--base-model", str(tiny_qwen2), "--max-steps", "8",
                           "--val-fraction", "0.2"))
    return tmp / "adapter", metrics


def test_two_processes_train_what_one_does_and_only_rank_0_writes(one_process, tiny_qwen2, tmp_path):
    env = audited(tmp_path, WATCH=str(tmp_path / "job"))
    audit = tmp_path / "audit"
    metrics = finished(cli(tmp_path / "job", "adapter", 2, "--base-model", str(tiny_qwen2), "--max-steps", "8",
                           "--val-fraction", "0.2", "--checkpoint-dir", str(tmp_path / "job" / "checkpoints"),
                           "--checkpoint-steps", "2", env=env))
    reference, expected = one_process
    assert metrics["world_size"] == 2 and expected["world_size"] == 1 and len(metrics["peak_memory_gb_per_gpu"]) == 2
    # 3 sequences a step: rank 0 computes 2, rank 1 one; the loss is still the mean over the whole batch's trained
    # tokens
    assert losses(tmp_path / "job" / "adapter") == pytest.approx(losses(reference), rel=1e-4)
    assert metrics["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-4)
    assert metrics["trained_tokens"] == expected["trained_tokens"] and metrics["tokens"] == expected["tokens"]
    two, one = (load_file(tmp_path / "job" / "adapter" / "adapter_model.safetensors"),
                load_file(reference / "adapter_model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-3, atol=1e-6), name
    assert any((one[n] != 0).any() for n in one if "lora_B" in n)  # trained: the comparison means something
    # rank 0 wrote the checkpoints and the adapter; rank 1 wrote nothing at all
    written = (audit / "rank-0").read_text()
    assert "checkpoints/checkpoint-" in written and "adapter" in written
    assert not (audit / "rank-1").exists(), (audit / "rank-1").read_text()


@pytest.mark.parametrize("stopped_in, resumed_in", [(2, 1), (1, 2)])
def test_sigterm_stops_every_rank_once_with_a_checkpoint_another_world_size_resumes(
        stopped_in, resumed_in, one_process, tiny_qwen2, tmp_path):
    """A job stopped by SIGTERM in one number of processes, resumed in another: the same steps, the same data order,
    as a job never stopped."""
    common = ["--base-model", str(tiny_qwen2), "--val-fraction", "0.2",
              "--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-steps", "1000", "--max-steps", "8"]
    proc = cli(tmp_path, "adapter", stopped_in, *common)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # rank 0 tells the steps
        if " step 2/8" in line:
            break
        assert time.monotonic() < deadline and proc.poll() is None
    ranks = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    if stopped_in == 1:  # trained in this process: the default SIGTERM action once the checkpoint is written
        assert proc.wait(timeout=60) == -signal.SIGTERM
    else:  # the launcher: every rank stopped after the same step, and the job's error says so
        assert proc.wait(timeout=60) == 2
        assert "asked to stop (SIGTERM) at step" in err and "a checkpoint was saved" in err
    written = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert len(written) == 1 and 2 <= int(written[0].split("-")[1]) < 8  # once, by one rank
    assert not (tmp_path / "adapter").exists()
    assert not running(ranks)

    metrics = finished(cli(tmp_path, "adapter", resumed_in, *common))
    assert metrics["resumed_from_step"] == int(written[0].split("-")[1]) and metrics["steps"] == 8
    assert metrics["world_size"] == resumed_in and metrics["labelled"] == "reused from the job directory"
    assert losses(tmp_path / "adapter") == pytest.approx(losses(one_process[0]), rel=1e-4)


def two_ranks_training(tiny_qwen2, tmp_path):
    """A 2-process CLI job at its step 2: the launcher's Popen, its 2 ranks (psutil, in rank order: RANK is set inside
    them, after exec, so /proc shows no trace of it) and every process of the job."""
    proc = cli(tmp_path, "adapter", 2, "--base-model", str(tiny_qwen2), "--max-steps", "80", "--epochs", "20",
               "--val-fraction", "0")
    for line in proc.stderr:
        if " step 2/" in line:
            break
    assert proc.poll() is None, proc.stderr.read()
    ranks = sorted((p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())),
                   key=lambda p: p.pid)
    assert len(ranks) == 2, proc.stderr.read()
    return proc, ranks, children(proc.pid)


def test_a_rank_killed_with_sigkill_fails_the_job_within_a_minute_and_leaves_nothing_running(tiny_qwen2, tmp_path):
    proc, ranks, everything = two_ranks_training(tiny_qwen2, tmp_path)
    killed_at = time.monotonic()
    ranks[1].kill()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 2 and time.monotonic() - killed_at < 60
    assert "training process 1 of 2 was killed by SIGKILL" in err and "resumes from its last checkpoint" in err
    assert not running(everything)
    assert not (tmp_path / "adapter").exists()


def test_a_two_process_job_listens_on_loopback_only(tiny_qwen2, tmp_path):
    """The rendezvous store, the ranks' store and gloo's sockets are bound to 127.0.0.1: nothing outside the container
    reaches them. The deployment here points gloo and NCCL at the node's network interface (as a container whose
    hostname resolves to eth0 does): the ranks of a one-node job use loopback all the same."""
    outward = next((name for name, addrs in psutil.net_if_addrs().items() for a in addrs
                    if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback), None)
    env = {"GLOO_SOCKET_IFNAME": outward, "NCCL_SOCKET_IFNAME": outward} if outward else {}
    proc = cli(tmp_path, "adapter", 2, "--base-model", str(tiny_qwen2), "--max-steps", "12", "--val-fraction", "0",
               env=env)
    for line in proc.stderr:
        if " step 2/" in line:
            break
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    listening = [(p.pid, c.laddr) for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    ranks = [p.pid for p in tree if "spawn_main" in " ".join(p.cmdline())]
    metrics = finished(proc)
    assert len(ranks) == 2 and {proc.pid, *ranks} <= {pid for pid, _ in listening}  # listed while all three ran
    assert all(ipaddress.ip_address(addr.ip).is_loopback for _, addr in listening), listening
    assert metrics["world_size"] == 2 and metrics["steps"] == 12


def test_a_stopped_rank_is_named_within_minutes_and_nothing_of_the_job_is_left(tiny_qwen2, tmp_path):
    """A rank that stops answering (SIGSTOP: its every thread stops) leaves the others waiting in the all-reduce for
    torch's collective timeout (30 minutes). Its heartbeat stops too: the launcher kills it and names it."""
    proc, ranks, everything = two_ranks_training(tiny_qwen2, tmp_path)
    try:
        ranks[1].suspend()  # SIGSTOP
        _, err = proc.communicate(timeout=180)  # the heartbeat's limit is 60 s; torch's own timeout, 30 minutes
    finally:
        for pid in [proc.pid, *everything]:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode == 2, err[-3000:]
    assert re.search(r"error: training process 1 of 2 stopped responding \(no heartbeat for \d+ s", err), err[-3000:]
    assert "resumes from its last checkpoint" in err
    assert not running(everything)
    assert not (tmp_path / "adapter").exists()


def audited(tmp_path: Path, **env) -> dict:
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    return {"PYTHONPATH": f"{audit}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WATCH_LOG": str(audit), **env}


def test_a_rank_that_raises_fails_the_job_with_its_own_error(tiny_qwen2, tmp_path):
    env = audited(tmp_path, WATCH=str(tmp_path), FAIL_RANK="1", FAIL_ON="tokenizer_config.json")
    proc = cli(tmp_path, "adapter", 2, "--base-model", str(tiny_qwen2), "--max-steps", "4", env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "error: training process 1 of 2 failed: OSError: [Errno 5] Input/output error (injected by the test)" in err
    assert not (tmp_path / "adapter").exists()


def test_the_handler_runs_a_two_process_job_through_the_sdk(tmp_path, storage, tiny_qwen2, recorder):
    env = {"TRAIN_PROCESSES": "2", "PROGRESS_INTERVAL_S": "0",
           "RUNPOD_WEBHOOK_POST_OUTPUT": recorder.url("/ddp?id=$ID")}
    with running_worker(tmp_path, **env) as worker:
        result = runsync(worker, {
            "job_id": "ddp-job", "dataset_url": storage.url(SAMPLE.name, storage.good),
            "hyperparameters": {"base_model": str(tiny_qwen2), "batch_size": 4, "epochs": 1, "rank": 4,
                                "max_seq_length": 256, "max_steps": 3},
            "gpu_config": {"type": "NVIDIA A100 80GB", "count": 2}})
        log = worker.log.read_text()
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert output["metrics"]["world_size"] == 2 and output["metrics"]["steps"] == 3
    assert (worker.jobs / "ddp-job" / "adapter" / "adapter_model.safetensors").is_file()
    assert "training in 2 processes" in log
    # rank 0 keeps the base model's 4-bit copy once training is over, when no rank waits for it in a collective
    assert log.index("kept a 4-bit copy of the base model") > log.index(" step 3/3 ")
    assert [p.name for p in (tmp_path / "models" / ".quantized").iterdir()][0].startswith(tiny_qwen2.name)
    steps = [b["output"]["current_step"] for p, b in recorder.posts if p.startswith(f"/ddp?id={result['id']}&")
             and b["output"]["stage"] == "training" and "metrics" in b["output"]]
    assert steps[-3:] == [1, 2, 3] and len(steps) == len(set(steps))  # rank 0's progress, once per step
    assert output["warnings"] and any("trained on the CPU" in w for w in output["warnings"])  # 2 asked, no GPU here


def test_train_processes_beyond_the_gpus_is_refused_at_once(tmp_path):
    settings = WorkerSettings.from_env({"JOBS_DIR": str(tmp_path), "TRAIN_PROCESSES": "0"})
    with pytest.raises(JobError, match=r"TRAIN_PROCESSES=0 .* set it between 1 and"):
        handler.training_processes(settings)
    assert handler.training_processes(WorkerSettings.from_env({"JOBS_DIR": str(tmp_path)})) == 1  # no GPU here



def test_the_apps_cancel_stops_every_rank_after_the_same_step_with_one_checkpoint(tiny_qwen2, tmp_path):
    """The app's Cancel, seen by the handler's row thread, reaches the ranks as a stop request in the checkpoint
    directory they share: every rank stops after the same step, rank 0 writes one checkpoint, the job is Cancelled."""
    checkpoints = tmp_path / "checkpoints"

    def cancel_at_step_2(event):
        if event.get("step") == 2 and "loss" in event:
            request_stop(checkpoints, "the app ended this job (the user cancelled it)")

    hp = Hyperparameters(max_steps=40, batch_size=2, max_seq_length=256, lora_rank=4, checkpoint_steps=1000, epochs=5)
    with pytest.raises(JobError) as stopped:
        train(load_dataset(SAMPLE)[0][:16], tiny_qwen2, tmp_path / "adapter", hp, on_progress=cancel_at_step_2,
              checkpoint_dir=checkpoints, fingerprint="f", processes=2)
    message = str(stopped.value)
    assert message.startswith("the app ended this job (the user cancelled it) at step ")
    assert re.search(r"a checkpoint was saved \(training process [01] of 2\)$", message)  # each rank says the same
    state, _ = load_latest_checkpoint(checkpoints, "f")
    assert [p.name for p in checkpoints.glob("checkpoint-*")] == [f"checkpoint-{state['state']['step']}"]
    assert 2 <= state["state"]["step"] <= 4 and not (tmp_path / "adapter").exists()
