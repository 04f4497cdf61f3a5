"""Saving the adapter: a full disk is named with what to do, and the resubmitted job resumes from its final
checkpoint without training again."""

import errno
import os

import peft.peft_model
import pytest
from safetensors import SafetensorError

from conftest import HP
from job import Hyperparameters, JobError
from train_lora import train


@pytest.mark.slow  # trains the tiny model
@pytest.mark.usefixtures("checkpoints_where_asked")
@pytest.mark.parametrize("error", ["OSError", "SafetensorError"])  # safetensors' writer raises the second
def test_a_full_disk_while_saving_the_adapter_is_clear_and_resumes_without_training_again(
        conversations, tiny_qwen2, tmp_path, monkeypatch, error):
    def disk_full(*args, **kwargs):  # the disk is outside the code under test
        if error == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    hp, checkpoints = Hyperparameters(**HP), tmp_path / "checkpoints"
    with pytest.raises(JobError,
                       match=r"could not save the adapter \((.*: )?No space left on device( \(os error 28\))?\): free"):
        train(conversations, tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=checkpoints, fingerprint="job-4")
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.tmp").exists()
    monkeypatch.undo()
    steps = []
    metrics = train(conversations, tiny_qwen2, tmp_path / "adapter", hp, checkpoint_dir=checkpoints,
                    fingerprint="job-4", on_progress=lambda e: steps.append(e) if "loss" in e else None).metrics
    # no step trained again: the one update with a loss is the resume's, at step 6, carrying the checkpoint's figures
    assert metrics["resumed_from_step"] == 6 and [e["step"] for e in steps] == [6]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
