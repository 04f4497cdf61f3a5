"""The job's labelled data: labelled in processes that all end with the labelling, whatever ends it, read back
for a resumed job only while it is still right, and a held-out side that cannot fit said, not dropped silently."""

import logging
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch

import labelled_data
from chat_templates import load_tokenizer
from checkpoints import Stopped, stop_on_sigterm
from conftest import SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters, JobError
from labelled_data import DATA_FILE, label_conversations, prepare_data
from train_lora import train

REUSED = "reused from the job directory"


def chat(i: int) -> dict:
    turns = []
    for k in range(20):
        turns += [{"role": "user", "content": f"question {i}.{k} " + "word " * 6},
                  {"role": "assistant", "content": f"answer {i}.{k} " + "word " * 6, "weight": 1}]
    return {"messages": [{"role": "system", "content": "Be brief."}] + turns}


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def label_in_two_processes(model, act) -> tuple[JobError, set[int]]:
    """Label 2,000 conversations in 2 processes (about 6 s on 2 cores) under the job's SIGTERM handler, with
    `act(pids)` run from a thread a second after both processes started; returns the JobError the labelling raised
    and every process it started."""
    tokenizer, chat_format = load_tokenizer(model)
    before, started = children(), set()

    def watch():
        deadline = time.monotonic() + 60
        while len(started) < 2 and time.monotonic() < deadline:
            started.update(children() - before)
            time.sleep(0.05)
        time.sleep(1.0)  # both are labelling now
        act(sorted(started))

    thread = threading.Thread(target=watch)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as the SDK's: the job's handler hands it on
    try:
        with stop_on_sigterm(checkpointing=False), pytest.raises(JobError) as raised:
            thread.start()
            label_conversations(tokenizer, [chat(i) for i in range(2000)], 2048, chat_format.end_of_turn, processes=2,
                                base_model=model)
    finally:
        signal.signal(signal.SIGTERM, previous)
        thread.join()
    assert len(started) == 2
    return raised.value, started


def test_a_labelling_process_killed_mid_way_fails_the_job_saying_so_and_leaves_no_process(tiny_qwen2):
    """A labelling process killed (by the out-of-memory killer, say) came back as `internal error (AttributeError ...)`
    and, its children immune to SIGTERM through the job's inherited handler, the worker never exited."""
    error, started = label_in_two_processes(tiny_qwen2, lambda pids: os.kill(pids[0], signal.SIGKILL))
    assert not isinstance(error, Stopped)
    message = str(error)
    assert "labelling process" in message and "killed by SIGKILL" in message and "out-of-memory killer" in message
    assert "GiB of memory" in message and "max_seq_length" in message and "more memory" in message
    assert not any(psutil.pid_exists(pid) for pid in started)  # killed and reaped, none left behind


def test_sigterm_while_labelling_stops_the_job_and_leaves_no_process(tiny_qwen2):
    error, started = label_in_two_processes(tiny_qwen2, lambda pids: os.kill(os.getpid(), signal.SIGTERM))
    assert isinstance(error, Stopped) and "asked to stop (SIGTERM)" in str(error)
    assert not any(psutil.pid_exists(pid) for pid in started)


def test_kept_labelled_data_holding_a_token_the_vocabulary_lacks_is_labelled_again_and_training_proceeds(
        tiny_qwen2, tmp_path, caplog):
    """Kept data with the right fingerprint and a token id of 1,000,000 failed every resume with `IndexError: index out
    of range in self` (an internal error)."""
    conversations = load_dataset(SAMPLE)[0][:16]
    hp = Hyperparameters(max_steps=1, batch_size=2, max_seq_length=384, lora_rank=4)
    keep = tmp_path / "checkpoints"
    prepare_data(conversations, tiny_qwen2, hp, keep_in=keep, fingerprint="job-1")
    saved = torch.load(keep / DATA_FILE, weights_only=True)
    saved["train"]["input_ids"][3] = 1_000_000
    torch.save(saved, keep / DATA_FILE)
    with caplog.at_level(logging.WARNING, logger="labelled_data"):
        metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=keep,
                        fingerprint="job-1").metrics
    assert metrics["steps"] == 1 and metrics["labelled"] != REUSED
    assert "token id 1000000" in caplog.text and "labelling again" in caplog.text


@pytest.mark.parametrize("change", ["labelling version", "tokenizer"])
def test_kept_labelled_data_is_not_reused_by_another_labelling_version_or_tokenizer(change, tiny_qwen2, tmp_path,
                                                                                     monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen2, model)
    conversations = load_dataset(SAMPLE)[0][:16]

    def labelled() -> str:
        return prepare_data(conversations, model, Hyperparameters(max_seq_length=384), keep_in=tmp_path / "keep",
                            fingerprint="job-1").labelled

    assert labelled() != REUSED and labelled() == REUSED  # the same job, labelling and tokenizer: read back
    if change == "labelling version":
        monkeypatch.setattr(labelled_data, "LABELLING_VERSION", labelled_data.LABELLING_VERSION + 1)
    else:  # the base model's tokenizer updated in place: a conversation without a system prompt gets another default
        template = model / "chat_template.jinja"
        template.write_text(template.read_text().replace("You are a helpful assistant.",
                                                         "You are a careful assistant."))
    assert labelled() != REUSED
    assert labelled() == REUSED


def test_a_held_out_conversation_that_cannot_fit_is_said_not_silently_dropped(tiny_qwen2):
    """The bundled sample at 256 tokens: its one held-out conversation cannot fit even shortened; the job says why
    there is no validation loss instead of reporting null."""
    data = prepare_data(load_dataset(SAMPLE)[0], tiny_qwen2, Hyperparameters(max_seq_length=256))
    assert data.validation == [] and data.counts["validation_examples"] == 0
    [warning] = [w for w in data.warnings if w.startswith("no validation loss")]
    assert "could not fit max_seq_length=256" in warning and "val_fraction" in warning
    fits = prepare_data(load_dataset(SAMPLE)[0], tiny_qwen2, Hyperparameters(max_seq_length=1024))
    assert fits.validation and not any(w.startswith("no validation loss") for w in fits.warnings)
