"""Loading the base model in 4 bits: the copy kept on the volume (named by what decides its bytes, written by one
worker at a time, set aside when it does not match the model, never written through a planted link) and what
becomes of a job when the copy cannot be kept."""

import json
import logging
import os
import resource
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from architecture import per_expert_model_class
from conftest import SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters
from model_loading import _keep_quantized_copy, causal_lm_class, load_base_model, quantized_copy_dir
from train_lora import train


@pytest.mark.slow  # trains the tiny model
def test_a_4bit_copy_the_volume_cannot_hold_leaves_nothing_behind_and_the_job_goes_on(tiny_qwen2, tmp_path, caplog):
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
    assert load_base_model(tiny_qwen2, "cpu", torch.float32,
                           quantized_cache=tmp_path / ".quantized")[1] == "quantized while loading"
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path / ".quantized")[1] == "4-bit copy"
    # a cache folder that cannot be made (a file where it should be): the job trains and delivers without the copy
    caplog.clear()
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    hp = Hyperparameters(max_steps=1, batch_size=2, max_seq_length=512, lora_rank=4, warmup_steps=0, val_fraction=0)
    result = train(load_dataset(SAMPLE)[0][:4], tiny_qwen2, tmp_path / "adapter", hp, quantized_cache=blocked)
    assert result.metrics["steps"] == 1 and "could not keep a 4-bit copy" in caplog.text
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_link_planted_as_the_4bit_copies_folder_is_never_written_through_nor_swept(tiny_qwen2, tmp_path, caplog):
    """MODEL_CACHE_DIR/.quantized planted as a link to a directory elsewhere: the copy is not kept (logged), nothing is
    written or deleted where the link points, and the job loads the base model itself."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    old = elsewhere / "tiny-0.tmp-x"  # what the sweep of day-old leftovers would delete
    old.mkdir()
    os.utime(old, (0, 0))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".quantized").symlink_to(elsewhere)
    for _ in range(2):
        model, source = load_base_model(tiny_qwen2, "cpu", torch.float32,
                                        quantized_cache=tmp_path / "models" / ".quantized")
        assert source == "quantized while loading"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["tiny-0.tmp-x"]
    assert "could not keep a 4-bit copy" in caplog.text and "is a symbolic link" in caplog.text


def test_a_copy_whose_weights_do_not_match_the_model_is_set_aside(tiny_qwen2, tmp_path, caplog):
    copy = quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, causal_lm_class(tiny_qwen2))
    load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    # a copy whose weights do not fit the model (here: one layer's weights missing) is set aside
    tensors = load_file(copy / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layers.1.mlp." not in k}, copy / "model.safetensors",
              metadata={"format": "pt"})
    model, source = load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)
    assert source == "quantized while loading" and "keys that do not match the model" in caplog.text
    assert load_base_model(tiny_qwen2, "cpu", torch.float32, quantized_cache=tmp_path)[1] == "4-bit copy"


def test_two_workers_writing_one_copy_at_once_and_a_killed_writers_leftovers(tiny_qwen2, tmp_path, caplog):
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
    stock = causal_lm_class(tiny_qwen2)
    names = {quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, stock),
             quantized_copy_dir(tiny_qwen2, torch.bfloat16, tmp_path, stock),
             quantized_copy_dir(tiny_mistral, torch.float32, tmp_path, stock),
             quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path,
                                per_expert_model_class(AutoModelForCausalLM, ("gate_proj", "up_proj", "down_proj")))}
    assert len(names) == 4
    assert quantized_copy_dir(tiny_qwen2, torch.float32, tmp_path, stock) in names  # and stable


@pytest.mark.slow  # trains the tiny model
def test_a_kept_4bit_copy_loads_the_same_model_on_later_jobs_and_a_broken_one_is_replaced(tiny_qwen2, tmp_path, caplog):
    conversations = load_dataset(SAMPLE)[0][:6]
    hp = Hyperparameters(max_steps=2, batch_size=2, max_seq_length=512, lora_rank=4, warmup_steps=0, val_fraction=0)
    cache = tmp_path / ".quantized"
    first = train(conversations, tiny_qwen2, tmp_path / "a", hp, quantized_cache=cache)
    copies = list(cache.iterdir())
    assert first.metrics["base_weights"] == "quantized while loading" and len(copies) == 1
    assert json.loads((copies[0] / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    second = train(conversations, tiny_qwen2, tmp_path / "b", hp, quantized_cache=cache)
    assert second.metrics["base_weights"] == "4-bit copy"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "training_log.jsonl").read_text().splitlines()]
              for d in "ab"]
    assert losses[0] == losses[1]  # the copy is the same 4-bit model, bit for bit
    # a copy that cannot be read is set aside: this job quantizes again and keeps a new copy
    (copies[0] / "model.safetensors").write_bytes(b"not a safetensors file")
    third = train(conversations, tiny_qwen2, tmp_path / "c", hp, quantized_cache=cache)
    assert third.metrics["base_weights"] == "quantized while loading" and "could not be used" in caplog.text
    assert train(conversations, tiny_qwen2, tmp_path / "d", hp,
                 quantized_cache=cache).metrics["base_weights"] == "4-bit copy"
