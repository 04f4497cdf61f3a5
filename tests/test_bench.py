"""The benchmark's configurations run and count tokens honestly (no timing is asserted here)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from bench_train import conversations, run_hf_trainer, run_ours  # noqa: E402
from job import Hyperparameters  # noqa: E402


def test_packed_padded_and_hf_trainer_configurations_run_on_the_same_data(tiny_qwen2, tmp_path):
    convs = conversations(copies=1)[:12]
    hp = dict(max_steps=3, epochs=20, batch_size=4, max_seq_length=1024, lora_rank=4, warmup_steps=1, gradient_checkpointing=False)
    packed = run_ours(convs, tiny_qwen2, Hyperparameters(**hp, packing=True), tmp_path / "packed")
    padded = run_ours(convs, tiny_qwen2, Hyperparameters(**hp, packing=False), tmp_path / "padded")
    baseline = run_hf_trainer(convs, tiny_qwen2, Hyperparameters(**hp, packing=False), tmp_path / "hf")
    for r in (packed, padded, baseline):
        assert r["steps"] == 3 and r["tokens_per_second"] > 0 and 0 < r["token_efficiency"] <= 1
    assert packed["token_efficiency"] > padded["token_efficiency"]  # packing removes padding
