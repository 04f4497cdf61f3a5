"""Jobs that survive: exact resume from checkpoints, crashes, SIGTERM, kill -9, a full disk,
corrupt checkpoints, the job lock, and a completed job that is not trained twice."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from checkpoints import load_latest_checkpoint
from conftest import ROOT, SAMPLE, running_worker, runsync
from dataset_loader import load_dataset
from files import JobLock
from job import Hyperparameters, JobError
from train_lora import train

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

HP = dict(max_steps=6, batch_size=2, max_seq_length=384, lora_rank=4, checkpoint_steps=2, warmup_steps=1)


class Crash(Exception):
    pass


@pytest.fixture(autouse=True)
def checkpoints_where_asked(monkeypatch):
    """These tests pin which steps have a checkpoint: every `checkpoint_steps`, not spaced by their write time
    (checkpoints.CHECKPOINT_TIME_SHARE; tested in tests/test_train_lora.py)."""
    import checkpoints

    monkeypatch.setattr(checkpoints, "CHECKPOINT_TIME_SHARE", 1.0)


def crash_at(step):
    def on_progress(event):
        if event.get("step") == step and "loss" in event:
            raise Crash(f"simulated crash after step {step}")
    return on_progress


@pytest.fixture(scope="module")
def conversations():
    return load_dataset(SAMPLE)[0][:16]


@pytest.fixture(scope="module")
def uninterrupted(conversations, tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return train(conversations, tiny_qwen2, out / "adapter", Hyperparameters(**HP)).metrics, out


def losses(adapter_dir):
    return [json.loads(l)["loss"] for l in (adapter_dir / "training_log.jsonl").read_text().splitlines()]


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_exactly_like_an_uninterrupted_one(
        conversations, tiny_qwen2, tmp_path, uninterrupted, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP), on_progress=crash_at(5),
              checkpoint_dir=checkpoints, fingerprint="job-1")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "labelled-data.pt", "training_log.jsonl"]
    import labelled_data

    labelled = []
    original = labelled_data.tokenize_conversation
    monkeypatch.setattr(labelled_data, "tokenize_conversation", lambda *a: labelled.append(1) or original(*a))
    metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
                    checkpoint_dir=checkpoints, fingerprint="job-1").metrics
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    assert labelled == [] and metrics["labelled"] == "reused from the job directory"  # not labelled again
    assert losses(tmp_path / "adapter") == pytest.approx(losses(uninterrupted[1] / "adapter"), abs=1e-6)


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
    from checkpoints import save_checkpoint

    save_checkpoint(tmp_path, 3, {"fingerprint": "old-settings", "state": {"step": 3}})
    state, warnings = load_latest_checkpoint(tmp_path, "new-settings")
    assert state is None and "different settings" in warnings[0]


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


def test_a_live_lock_refuses_a_second_worker_and_a_dead_owners_lock_is_taken_over(tmp_path):
    lock = tmp_path / "job.lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock.write_text(json.dumps({"token": "x", "host": socket.gethostname(), "pid": live.pid, "started": time.time()}))
    try:
        with pytest.raises(JobError, match=f"already running on another worker \\(pid {live.pid}"):
            JobLock(lock).acquire()
    finally:
        live.kill()
        live.wait()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time()}))
    taken = JobLock(lock)
    taken.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()


def test_a_lock_whose_heartbeat_stopped_is_stale(tmp_path):
    lock = tmp_path / "job.lock"
    lock.write_text(json.dumps({"host": "another-worker", "pid": 1, "started": 0}))
    with pytest.raises(JobError, match="already running"):
        JobLock(lock, stale_after_s=600).acquire()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    JobLock(lock, stale_after_s=600).acquire()


def test_kill_9_mid_training_then_the_same_job_resumes_and_completes(storage, tiny_qwen2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model_loading import quantization_config

    job = {"job_id": "kill-9", "dataset_url": storage.url(SAMPLE.name, storage.good),
           "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 40, "batch_size": 1, "max_seq_length": 384,
                               "lora_rank": 4, "checkpoint_steps": 3}}
    (tmp_path / "first").mkdir()
    with running_worker(tmp_path / "first") as worker:
        # The SDK's local server runs a job inside the request that asks for it: send it from a thread.
        def submit():
            try:
                requests.post(f"{worker.url}/runsync", json={"input": job}, timeout=300)
            except requests.ConnectionError:
                pass  # the worker is killed mid-job: no answer is the point

        threading.Thread(target=submit, daemon=True).start()
        checkpoints = worker.jobs / "kill-9" / "checkpoints"
        deadline = time.monotonic() + 180
        while not any(p.name.startswith("checkpoint-") and p.name[11:].isdigit() for p in checkpoints.glob("*")):
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.2)
        worker.proc.kill()  # SIGKILL: no handler runs, the lock file stays behind
        worker.proc.wait()
    assert (tmp_path / "first" / "jobs" / "kill-9" / "job.lock").exists()
    (tmp_path / "second").mkdir()
    os.symlink(tmp_path / "first" / "jobs", tmp_path / "second" / "jobs")  # the same volume, a new worker
    with running_worker(tmp_path / "second") as worker:
        result = runsync(worker, job)
        assert result["status"] == "COMPLETED", result
        metrics = result["output"]["metrics"]
        assert metrics["resumed_from_step"] > 0 and metrics["steps"] == 40
        again = runsync(worker, job)  # a completed job is not trained twice
        assert again["status"] == "COMPLETED" and again["output"]["metrics"] == metrics
        assert any("already completed" in w for w in again["output"]["warnings"])
        other = runsync(worker, {**job, "hyperparameters": {**job["hyperparameters"], "lora_rank": 8}})
        assert other["status"] == "FAILED"
        assert other["error"] == ("starting: job kill-9 already completed with other settings or another dataset: "
                                  "send retrain: true to train it again with these, or use a new job_id")
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2, quantization_config=quantization_config(torch.float32),
                                                dtype=torch.float32)
    PeftModel.from_pretrained(base, result["output"]["adapter_path"])  # the final adapter loads


@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # safetensors' writer raises the second
def test_a_full_disk_while_saving_the_adapter_is_clear_and_resumes_without_training_again(
        conversations, tiny_qwen2, tmp_path, monkeypatch, error):
    import peft.peft_model
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):  # the disk is outside the code under test
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    hp, checkpoints = Hyperparameters(**HP), tmp_path / "checkpoints"
    with pytest.raises(JobError, match=r"could not save the adapter \((.*: )?No space left on device( \(os error 28\))?\): free"):
        train(conversations, tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=checkpoints, fingerprint="job-4")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.tmp").exists()
    monkeypatch.undo()
    steps = []
    metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=checkpoints, fingerprint="job-4",
                    on_progress=lambda e: steps.append(e) if "loss" in e else None).metrics
    # no step trained again: the one update with a loss is the resume's, at step 6, carrying the checkpoint's figures
    assert metrics["resumed_from_step"] == 6 and [e["step"] for e in steps] == [6]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


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


def test_a_restarted_container_reusing_our_pid_is_not_mistaken_for_a_live_owner(tmp_path):
    lock = tmp_path / "job.lock"
    lock.write_text(json.dumps({"token": "an-earlier-life", "host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    taken = JobLock(lock)
    taken.acquire()  # same pid, not our token: the previous container's lock
    other = JobLock(lock)
    other.held = True  # a worker that lost its lock to us must not delete ours
    other.release()
    assert json.loads(lock.read_text())["token"] == taken.token
    taken.release()
    assert not lock.exists()


def test_a_4bit_copy_the_volume_cannot_hold_leaves_nothing_behind_and_the_job_goes_on(tiny_qwen2, tmp_path, caplog):
    import resource
    import signal

    from model_loading import load_base_model

    # A real write failure: files may not grow past 64 KiB (EFBIG), so safetensors' writer fails as on a full disk.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        model, source = load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path / ".quantized")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert source == "quantized while loading" and "could not keep a 4-bit copy" in caplog.text
    assert list((tmp_path / ".quantized").iterdir()) == []  # no partial copy, no temporary directory
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path / ".quantized")[1] == "quantized while loading"
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path / ".quantized")[1] == "4-bit copy"


def test_a_link_planted_as_the_4bit_copies_folder_is_never_written_through_nor_swept(tiny_qwen2, tmp_path, caplog):
    """MODEL_CACHE_DIR/.quantized planted as a link to a directory elsewhere: the copy is not kept (logged), nothing is
    written or deleted where the link points, and the job loads the base model itself."""
    from model_loading import load_base_model

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = elsewhere / "tiny-0.tmp-x"  # what the sweep of day-old leftovers would delete
    old.mkdir()
    os.utime(old, (0, 0))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".quantized").symlink_to(elsewhere)
    for _ in range(2):
        model, source = load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path / "models" / ".quantized")
        assert source == "quantized while loading"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["tiny-0.tmp-x"]
    assert "could not keep a 4-bit copy" in caplog.text and "is a symbolic link" in caplog.text


def test_a_copy_whose_weights_do_not_match_the_model_is_set_aside(tiny_qwen2, tmp_path, caplog):
    from model_loading import causal_lm_class, load_base_model, quantized_copy_dir

    copy = quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, causal_lm_class(tiny_qwen2))
    load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    # a copy whose weights do not fit the model (here: one layer's weights missing) is set aside
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1.mlp." not in k}, copy / "model.safetensors", metadata={"format": "pt"})
    model, source = load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    assert source == "quantized while loading" and "keys that do not match the model" in caplog.text
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)[1] == "4-bit copy"


def test_two_workers_writing_one_copy_at_once_and_a_killed_writers_leftovers(tiny_qwen2, tmp_path, caplog):
    import logging

    from model_loading import _keep_quantized_copy, load_base_model

    model, _ = load_base_model(tiny_qwen2, "cpu", torch.float32)
    copy = tmp_path / "tiny-qwen2-0123456789abcdef"
    both_written = threading.Barrier(2, timeout=60)
    save = model.save_pretrained

    def save_then_wait(*args, **kwargs):  # both workers have written their files before either renames
        save(*args, **kwargs)
        both_written.wait()

    model.save_pretrained = save_then_wait
    with caplog.at_level(logging.INFO):
        workers = [threading.Thread(target=_keep_quantized_copy, args=(model, copy)) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert (copy / "config.json").is_file() and "another worker kept the 4-bit copy" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [copy.name]  # the loser's directory is gone
    # leftovers of killed workers: swept by the next load once a day old, a live writer's kept
    old, recent = tmp_path / f"{copy.name}.tmp-killed", tmp_path / f"{copy.name}.bad-0badc0de"
    for leftover in (old, recent):
        leftover.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    assert not old.exists() and recent.exists()


def test_a_copy_is_kept_when_the_fault_is_not_the_copys(tiny_qwen2, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from model_loading import load_base_model

    load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    (copy,) = [p for p in tmp_path.iterdir()]
    with pytest.raises(ImportError):  # an attention backend that is not installed fails the copy and the base alike
        load_base_model(tiny_qwen2, "cpu", torch.float32, attention="flash_attention_2", quantized_cache=tmp_path)
    assert (copy / "config.json").is_file()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(out_of_memory))
    with pytest.raises(torch.OutOfMemoryError):
        load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    monkeypatch.undo()
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)[1] == "4-bit copy"


def test_the_copy_is_named_by_what_decides_its_bytes(tiny_qwen2, tiny_mistral, tmp_path):
    from transformers import AutoModelForCausalLM

    from architecture import per_expert_model_class
    from model_loading import causal_lm_class, quantized_copy_dir

    stock = causal_lm_class(tiny_qwen2)
    names = {quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, stock),
             quantized_copy_dir(tiny_qwen2, torch.bfloat16, tmp_path, stock),
             quantized_copy_dir(tiny_mistral, torch.float32, tmp_path, stock),
             quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path,
                                per_expert_model_class(AutoModelForCausalLM, ("gate_proj", "up_proj", "down_proj")))}
    assert len(names) == 4
    assert quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, stock) in names  # and stable


@pytest.fixture
def out_of_memory_once():
    """Arms a fault: the GPU running out of memory, once, in a decoder layer of a forward that trains,
    after `after` such layer calls (a CPU has no GPU memory to run out of; everything after the fault
    is real). Returns the list it appends each fault to (whether that layer was recomputing)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    faults, countdown = [], []

    def hook(module, args):
        if countdown and isinstance(module, Qwen2DecoderLayer) and torch.is_grad_enabled():
            countdown[0] -= 1
            if countdown[0] < 0:
                countdown.clear()
                faults.append(getattr(module, "gradient_checkpointing", False))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def arm(after: int = 0):
        countdown.append(after)
        return faults

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield arm
    handle.remove()


def test_auto_checkpointing_turns_on_when_a_step_runs_out_of_memory_and_redoes_it(conversations, tiny_qwen2, tmp_path,
                                                                                   out_of_memory_once, caplog):
    hp = dict(HP, max_steps=3, micro_batch_size=1, lora_dropout=0.0)  # no dropout: the failed attempt draws no random masks
    reference = train(conversations, tiny_qwen2, tmp_path / "ref", Hyperparameters(**hp, gradient_checkpointing=True))
    faults = out_of_memory_once(after=2)  # in the step's second micro-batch, the first one's gradients already there
    result = train(conversations, tiny_qwen2, tmp_path / "auto", Hyperparameters(**hp, gradient_checkpointing="auto"))
    assert faults == [False]  # the fault came with recomputation off, as "auto" chose on this CPU
    assert result.metrics["recomputation"] == "on from step 1 (out of memory without it)"
    assert result.metrics["gradient_checkpointing"] is True
    assert "turning it on and redoing the step" in caplog.text
    layers = result.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    # The step was redone from scratch: the same losses as a job that recomputed from the start.
    assert result.metrics["steps"] == reference.metrics["steps"] == 3
    ours = [json.loads(line)["loss"] for line in (tmp_path / "auto" / "training_log.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "training_log.jsonl").read_text().splitlines()]
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_a_job_that_turned_checkpointing_on_resumes_with_it_on(conversations, tiny_qwen2, tmp_path, out_of_memory_once):
    faults = out_of_memory_once()
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP), on_progress=crash_at(3),
              checkpoint_dir=checkpoints, fingerprint="job-oom")
    assert faults == [False]
    result = train(conversations, tiny_qwen2, tmp_path / "adapter", Hyperparameters(**HP),
                   checkpoint_dir=checkpoints, fingerprint="job-oom")
    assert faults == [False]  # no second fault was armed: nothing ran out of memory after the resume
    assert result.metrics["resumed_from_step"] == 2
    assert result.metrics["recomputation"] == "on from step 1 (out of memory without it)"
    assert result.metrics["gradient_checkpointing"] is True
    assert all(layer.gradient_checkpointing for layer in result.model.get_base_model().model.layers)


@pytest.mark.parametrize("setting, advice", [(False, 'set it to "auto" or true'), (True, "reduce hyperparameters.micro_batch_size")])
def test_running_out_of_memory_with_checkpointing_chosen_fails_with_what_to_change(conversations, tiny_qwen2, tmp_path,
                                                                                   out_of_memory_once, setting, advice):
    faults = out_of_memory_once()
    with pytest.raises(JobError, match="ran out of memory at step 1") as caught:
        train(conversations, tiny_qwen2, tmp_path / "out", Hyperparameters(**HP, gradient_checkpointing=setting),
              checkpoint_dir=tmp_path / "checkpoints")
    assert advice in str(caught.value) and "resumes from the last checkpoint" in str(caught.value)
    assert faults == [setting] and not (tmp_path / "out").exists()
