"""The benchmark's configurations run and count tokens honestly (no timing is asserted here)."""

import json
import subprocess
import sys

import pytest

from chat_templates import load_tokenizer
from conftest import ROOT
from labelled_data import label_conversations
from tiny_model import build_tiny_model

sys.path.insert(0, str(ROOT / "bench"))

from bench_train import conversations, run_hf_trainer, run_ours  # noqa: E402

from job import Hyperparameters  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out


def test_packed_padded_and_hf_trainer_configurations_run_on_the_same_data(tiny_qwen2, tmp_path):
    """One epoch of the same 12 conversations, none held out, as the cpu mode runs them: each configuration trains
    every token of them once (12 conversations of 464 to 1,024 tokens: 3 steps of 4, packed or not)."""
    convs = conversations(copies=1)[:12]
    hp = dict(epochs=1, val_fraction=0, batch_size=4, max_seq_length=1024, lora_rank=4, warmup_steps=1,
              gradient_checkpointing=False)
    packed = run_ours(convs, tiny_qwen2, Hyperparameters(**hp, packing=True), tmp_path / "packed")
    padded = run_ours(convs, tiny_qwen2, Hyperparameters(**hp, packing=False), tmp_path / "padded")
    baseline = run_hf_trainer(convs, tiny_qwen2, Hyperparameters(**hp, packing=False), tmp_path / "hf")
    for r in (packed, padded, baseline):
        assert r["steps"] == 3 and r["tokens_per_second"] > 0 and 0 < r["token_efficiency"] <= 1
        assert r["epochs_begun"] == 1
    assert packed["token_efficiency"] > padded["token_efficiency"]  # packing removes padding
    tokenizer, chat_format = load_tokenizer(tiny_qwen2)
    examples, _ = label_conversations(tokenizer, convs, hp["max_seq_length"], chat_format.end_of_turn)
    assert len(examples) == len(convs)
    tokens = sum(len(e.input_ids) for e in examples)
    assert packed["real_tokens"] == padded["real_tokens"] == baseline["real_tokens"] == tokens


def test_the_gpu_mode_flow_runs_on_a_model_built_from_a_config(tiny_qwen2, tmp_path):
    """The gpu mode's own steps (a model built from config.json with random weights, saved, trained in
    each configuration, results written) checked on the CPU; nothing here is a GPU figure."""
    config = tmp_path / "tiny-config.json"
    config.write_text((tiny_qwen2 / "config.json").read_text())
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "bench/bench_train.py", "--mode", "gpu", "--allow-cpu",
                          "--configs", str(config), "--steps", "2", "--max-seq-length", "512", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["models"]["tiny-config"]
    assert set(row) == {"packed", "padded", "hf_trainer", "packed_mb1_auto"}
    assert [row[c]["gradient_checkpointing"] for c in ("packed", "padded", "hf_trainer")] == ["on"] * 3
    assert row["packed_mb1_auto"]["micro_batch_size"] == 1 and row["packed_mb1_auto"]["gradient_checkpointing"] == "off"
    assert result["bf16_matmul_peak_tflops"] is None and 0 < result["token_efficiency_packed"] <= 1


def test_the_load_benchmark_compares_stock_ours_and_the_copy(tmp_path):
    """bench_load.py's flow on a tiny Qwen3-Next config: three ways, each in its own process, and what
    each holds in 4-bit (memory and times are the benchmark's to report, not asserted here)."""
    config = tmp_path / "tiny-moe.json"
    config.write_text((build_tiny_model("qwen3_next", tmp_path / "model") / "config.json").read_text())
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "bench/bench_load.py", "--configs", str(config), "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
    assert [rows[w]["source"] for w in ("stock", "ours", "copy")] == ["stock", "quantized while loading", "4-bit copy"]
    assert rows["ours"]["fraction_in_4bit"] == rows["copy"]["fraction_in_4bit"] > rows["stock"]["fraction_in_4bit"]
    assert 0 < rows["copy"]["bytes_read_mb"] < rows["ours"]["bytes_read_mb"]


def test_the_labelling_benchmark_compares_one_and_two_processes_on_the_same_data(tmp_path):
    """bench_label.py labels the same conversations in 1 and in 2 processes and fails if they differ."""
    out = tmp_path / "label.json"
    run = subprocess.run([sys.executable, "bench/bench_label.py", "--conversations", "60", "--processes", "1", "2",
                          "--max-seq-length", "512", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["processes"] for r in rows] == [1, 2]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 0 and rows[0]["examples"] == rows[1]["examples"] == 60
    assert all(r["labelled_tokens_per_second"] > 0 for r in rows)
