"""Saving the adapter: a full disk is named with what to do, and the resubmitted job resumes from its final
checkpoint without training again."""

import errno
import os

import peft.peft_model
import pytest
import torch
from peft import get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file

import model_loading
from adapter import lora_weights
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


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"], ["embed_tokens", "q_proj"]])
def test_the_weights_cast_once_are_what_peft_saves_cast_after(tiny_qwen2, tmp_path, targets):
    """`lora_weights` given to PEFT's save_pretrained writes what PEFT writes on its own, cast to the saved dtype
    afterwards: the same keys (an adapted embedding or output layer saved whole, as PEFT does) and the same values."""
    base, _ = model_loading.load_base_model(tiny_qwen2, "cpu", torch.float32)
    model = get_peft_model(base, model_loading.lora_config(Hyperparameters(lora_rank=4), targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(tmp_path / "peft")
    model.save_pretrained(tmp_path / "ours", state_dict=lora_weights(model, torch.bfloat16))
    expected = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k]) for k, v in saved.items())
    whole = [k for k in saved if "lora_" not in k]
    assert bool(whole) == ("lm_head" in targets or "embed_tokens" in targets)
