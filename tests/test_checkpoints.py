"""Checkpoints: a crashed or stopped run resumes exactly where its last checkpoint left it; a corrupt checkpoint
or one of other settings is set aside; a failed write is named and keeps the previous one; checkpoints are spaced by
their cost; SIGTERM ends a job at any stage."""

import errno
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoints
import handler
import labelled_data
from checkpoints import load_latest_checkpoint, save_checkpoint
from conftest import HP, ROOT, SAMPLE, Crash, crash_at, losses
from dataset_loader import load_dataset
from job import Hyperparameters, JobError
from train_lora import train


@pytest.fixture(scope="module")
def uninterrupted(conversations, tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return train(conversations, tiny_qwen2, out / "adapter", Hyperparameters(**HP)).metrics, out


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_exactly_like_an_uninterrupted_one(
        conversations, tiny_qwen2, tmp_path, uninterrupted, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP), on_progress=crash_at(5),
              checkpoint_dir=checkpoints, fingerprint="job-1")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "labelled-data.pt",
                                                             "training_log.jsonl"]
    labelled = []
    original = labelled_data.tokenize_conversation
    monkeypatch.setattr(labelled_data, "tokenize_conversation", lambda *a: labelled.append(1) or original(*a))
    metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
                    checkpoint_dir=checkpoints, fingerprint="job-1").metrics
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    assert labelled == [] and metrics["labelled"] == "reused from the job directory"  # not labelled again
    assert losses(tmp_path / "adapter") == pytest.approx(losses(uninterrupted[1] / "adapter"), abs=1e-6)


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_a_corrupt_checkpoint_is_set_aside_and_the_previous_one_is_used(conversations, tiny_qwen2, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP), on_progress=crash_at(5),
              checkpoint_dir=checkpoints, fingerprint="job-2")
    state = checkpoints / "checkpoint-4" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # truncated mid-write by a dying disk
    metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
                    checkpoint_dir=checkpoints, fingerprint="job-2").metrics
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    checkpoint_warnings = [w for w in metrics["warnings"] if w.startswith("checkpoint ")]
    assert len(checkpoint_warnings) == 1
    assert checkpoint_warnings[0].startswith("checkpoint checkpoint-4 was set aside because it could not be read")
    assert (checkpoints / "checkpoint-4.bad").is_dir()


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    save_checkpoint(tmp_path, 3, {"fingerprint": "old-settings", "state": {"step": 3}})
    state, warnings = load_latest_checkpoint(tmp_path, "new-settings")
    assert state is None and "different settings" in warnings[0]


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_previous_one(
        conversations, tiny_qwen2, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):  # the disk is outside the code under test
        calls.append("lora" in obj)  # checkpoints (the labelled data is saved once, first)
        if sum(calls) > 1:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(JobError, match=r"could not write the checkpoint of step 4 \(No space left on device\).*"
                                       r"checkpoint checkpoint-2 is intact"):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
              checkpoint_dir=tmp_path / "checkpoints", fingerprint="job-3")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-2", "labelled-data.pt", "training_log.jsonl"]
    state, warnings = load_latest_checkpoint(tmp_path / "checkpoints", "job-3")
    assert state["state"]["step"] == 2 and warnings == []
    assert not (tmp_path / "adapter").exists()
    # a real write failure inside torch.save: files cannot grow past 64 KiB (EFBIG; torch raises RuntimeError)
    direct = tmp_path / "direct"
    direct.mkdir()
    save_checkpoint(direct, 2, {"step": 2})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # files cannot grow past 64 KiB: EFBIG, as a full disk
    try:
        with pytest.raises(JobError, match=r"could not write the checkpoint of step 4 .*free space on the volume .*"
                                           r"checkpoint-2 is intact"):
            save_checkpoint(direct, 4, {"step": 4, "weights": torch.zeros(1 << 16)})  # 256 KiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert sorted(p.name for p in direct.iterdir()) == ["checkpoint-2"]  # no temporary left


@pytest.mark.slow  # starts processes
def test_sigterm_during_training_writes_a_checkpoint_then_exits(tiny_qwen2, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "train_lora.py", "train", "--dataset", str(SAMPLE), "--base-model", str(tiny_qwen2),
         "--output", str(tmp_path / "adapter"), "--checkpoint-dir", str(checkpoints), "--max-steps", "500",
         "--max-seq-length", "384", "--lora-rank", "4", "--checkpoint-steps", "100000", "--epochs", "20"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # wait until training is under way
        if " step 2/" in line:
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    assert proc.wait(timeout=60) == -signal.SIGTERM  # the default SIGTERM action, after the checkpoint
    written = [p.name for p in checkpoints.glob("checkpoint-*")]
    assert len(written) == 1 and int(written[0].split("-")[1]) >= 2
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
def test_a_checkpoint_at_the_end_of_an_epoch_resumes_with_the_next_epochs_order(conversations, tiny_qwen2, tmp_path):
    hp = dict(HP, packing=False, max_steps=8, epochs=2, batch_size=4, checkpoint_steps=4)
    whole = train(conversations, tiny_qwen2, tmp_path / "whole", Hyperparameters(**hp)).metrics
    with pytest.raises(Crash):  # 16 conversations / batch 4: step 4 ends epoch 1
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**hp), on_progress=crash_at(5),
              checkpoint_dir=tmp_path / "checkpoints", fingerprint="job-5")
    resumed = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**hp),
                    checkpoint_dir=tmp_path / "checkpoints", fingerprint="job-5").metrics
    assert resumed["resumed_from_step"] == 4 and whole["steps"] == resumed["steps"] == 8
    assert losses(tmp_path / "adapter") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)


def test_sigterm_during_the_download_ends_the_job_at_once_and_reaches_the_sdk(storage, tiny_qwen2, tmp_path,
                                                                              monkeypatch):
    """Under the SDK, SIGTERM only asked the SDK to stop taking jobs: a job in its download (or model load) ran on to
    its end, and the later SIGKILL found no checkpoint. Now it ends the job at once, and the SDK still hears it."""
    for key, value in {"JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
                       "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(key, value)
    heard = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))  # as the SDK's handler
    storage.delay[SAMPLE.name] = 30  # the dataset server takes its time
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        start = time.monotonic()
        result = handler.handler({"id": "t1",
                                  "input": {"job_id": "stopped", "dataset_url": storage.url(SAMPLE.name, storage.good),
                                            "hyperparameters": {"base_model": str(tiny_qwen2)}}})
        took = time.monotonic() - start
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result["error"] == "downloading: the worker was asked to stop (SIGTERM); resubmit the job"
    assert took < 10 and heard == [signal.SIGTERM]
    assert not list((tmp_path / "jobs" / "stopped").glob("dataset.download*"))


@pytest.mark.slow  # trains the tiny model
def test_a_checkpoint_costs_the_same_at_any_step_and_the_log_holds_every_step(tiny_qwen2, tmp_path, monkeypatch):
    """The per-step records go to training_log.jsonl as they are made, not into every checkpoint (which rewrote all of
    them: 7.5 MB and 0.86 s a checkpoint at step 100,000)."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_TIME_SHARE", 1.0)  # a checkpoint every 10 steps, however cheap
    hp = Hyperparameters(max_steps=40, epochs=20, batch_size=1, max_seq_length=256, lora_rank=4, checkpoint_steps=10)
    train(load_dataset(SAMPLE)[0][:12], tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=tmp_path / "ck",
          fingerprint="f")
    sizes = {step: len(pickle.dumps(torch.load(tmp_path / "ck" / f"checkpoint-{step}" / "state.pt",
                                               weights_only=True)["state"]))
             for step in (30, 40)}
    assert abs(sizes[40] - sizes[30]) < 400, sizes  # ten more steps: ten more records were ~3.8 kB
    logged = [json.loads(line) for line in (tmp_path / "ck" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 41))
    assert ((tmp_path / "adapter" / "training_log.jsonl").read_text()
            == (tmp_path / "ck" / "training_log.jsonl").read_text())


@pytest.mark.slow  # trains the tiny model
def test_checkpoints_every_step_on_a_slow_volume_take_a_small_share_of_the_time(tiny_qwen2, tmp_path, monkeypatch):
    """checkpoint_steps 1 with each write taking 0.5 s (fsync on a slow network volume): checkpoints are spaced by their
    cost (at most a tenth of the time), where before each of the 40 steps wrote one."""
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (time.sleep(0.5), fsync(fd)))
    hp = Hyperparameters(max_steps=40, epochs=20, batch_size=1, max_seq_length=256, lora_rank=4, checkpoint_steps=1)
    m = train(load_dataset(SAMPLE)[0][:12], tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=tmp_path / "ck",
              fingerprint="f").metrics
    written, spent = m["checkpoints"]["written"], m["checkpoints"]["seconds"]
    print(f"{written} checkpoints in {spent:.1f} s of {m['train_seconds']:.1f} s training")
    # the first, then one each 9 x its write time of training at most, and the final one
    assert 2 <= written <= 2 + m["train_seconds"] / (9 * 0.5), written
