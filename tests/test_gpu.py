"""What only a CUDA GPU can check, marked `gpu` and skipped without one: flex attention's backward with the
packed document mask against sdpa's, 4-bit training in bf16 and in fp16, the kept 4-bit copy of the base reloaded
on the GPU, and two ranks over NCCL (two GPUs).

tests/conftest.py hides any GPU from the test processes (CUDA_VISIBLE_DEVICES=""), so that the CPU tests stay CPU
tests on a GPU machine. Each check here therefore runs in a child process, this file run as a script
(`python tests/test_gpu.py <check> <work dir>`), with the devices restored: GPU_CHECK_VISIBLE_DEVICES (what
scripts/gpu_check.py sets: the devices it was given), or every GPU of the machine when that is unset. A child
prints one JSON line, its figures, which the test then judges; a child that finds the check cannot run here
exits with SKIP (the test is skipped with its reason).

    make gpu-check                                            # these, the versions and a 7B job (scripts/gpu_check.py)
    .venv/bin/pytest -m gpu -p no:cacheprovider tests/test_gpu.py   # these alone
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # not from conftest: the child processes must not import it
SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"
SKIP = 77  # a child's exit status for "this check cannot run on this machine" (its last line says why)
CHILD_TIMEOUT_S = 600


# ---------------------------------------------------------------------------- in the test process

def gpu_env() -> dict:
    """The environment of a child that may use the GPUs: the test's own, with CUDA_VISIBLE_DEVICES restored."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if "GPU_CHECK_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["GPU_CHECK_VISIBLE_DEVICES"]
    return {**env, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or no library: no GPU
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


@functools.lru_cache(maxsize=None)
def visible_gpus() -> tuple[int, str]:
    """(CUDA devices a child process sees, what was found): NVML (or nvidia-smi) first, which costs nothing where there
    is no driver; then torch itself in a child with the devices restored."""
    if not _nvml_gpus() and shutil.which("nvidia-smi") is None:
        return 0, "no NVIDIA driver here (NVML finds no GPU, no nvidia-smi)"
    probe = subprocess.run([sys.executable, "-c",
                            "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() "
                            "else 0, torch.__version__)"], env=gpu_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return 0, f"torch could not be asked for CUDA devices: {probe.stderr.strip()[-500:]}"
    count, version = probe.stdout.split()[-2:]  # its last line
    visible = os.environ.get("GPU_CHECK_VISIBLE_DEVICES")
    return int(count), f"torch {version} sees {count} CUDA device(s) (GPU_CHECK_VISIBLE_DEVICES={visible!r})"


def require_gpus(n: int = 1) -> None:
    count, found = visible_gpus()
    if count < n:
        pytest.skip(f"needs {n} CUDA GPU(s): {found}")


def child(check: str, tmp_path: Path, *args: str) -> dict:
    """Run `check` in a child process with the GPUs visible; its JSON figures, or the test skipped or failed."""
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), check, str(tmp_path), *args], cwd=ROOT,
                         env=gpu_env(), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = run.stdout.strip().splitlines()
    if run.returncode == SKIP:
        pytest.skip(lines[-1] if lines else "the check cannot run here")
    assert run.returncode == 0, f"{check} failed (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- the tests

@pytest.mark.gpu
def test_flex_attention_backward_equals_sdpa_with_the_packed_document_mask(tmp_path):
    """The GPU's packed path (collate's BlockMask, flex attention compiled by Triton) against sdpa's dense
    block-diagonal mask, on the worker's own model (4-bit base, LoRA) and loss: the loss and every LoRA gradient,
    with and without recomputation, and the evaluation's loss. A mask that lets packed examples see each other
    moves the gradients far more than bf16 rounding does: the comparison means something."""
    require_gpus(1)
    r = child("flex", tmp_path)
    assert r["attention"] == "flex_attention" and r["mask"] == "BlockMask"
    for name in ("flex", "flex_recompute"):
        assert r[name]["loss_rel"] < 1e-2, r
        assert r[name]["grad_rel"] < 5e-2, r  # bf16: flex and sdpa round and sum in different orders
        assert r[name]["worst_param_rel"] < 0.15, r
        assert r[name]["grad_cosine"] > 0.995, r
    assert r["eval_loss_rel"] < 1e-2, r
    # on the CPU (sdpa against itself with this leaky mask) the leak moved the LoRA gradients by ~100%
    assert r["leaky"]["grad_rel"] > max(0.2, 5 * max(r["flex"]["grad_rel"], r["flex_recompute"]["grad_rel"])), r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_4bit_training_steps_on_the_gpu(dtype, tmp_path):
    """`train_lora.train` on the tiny model and the bundled sample in `compute_dtype` bf16 and fp16: finite losses
    that go down over the epochs, validation losses, the adapter saved in that 16-bit type."""
    require_gpus(1)
    r = child("train", tmp_path, dtype)
    m = r["metrics"]
    assert m["device"] == "cuda" and m["compute_dtype"] == dtype and m["peak_memory_gb"] > 0
    losses = r["losses"]
    assert len(losses) == m["steps"] >= 8 and all(math.isfinite(x) for x in losses), losses
    assert all(v is not None and math.isfinite(v) for v in r["validation_losses"]) and len(r["validation_losses"]) >= 2
    first, last = r["epoch_means"][0], r["epoch_means"][-1]
    assert last < 0.95 * first, r["epoch_means"]  # it learns (the same job on the CPU: ~0.91x in bf16 and in fp16)
    assert r["validation_losses"][-1] < r["validation_losses"][0], r["validation_losses"]
    assert r["saved_dtypes"] == [dtype] and r["saved_finite"] and r["lora_b_nonzero"]
    assert set(r["files"]) >= {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "training_log.jsonl"}


@pytest.mark.gpu
def test_the_kept_4bit_copy_reloads_on_the_gpu_and_trains_alike(tmp_path):
    """KEEP_QUANTIZED_BASE on a GPU: the first job quantizes while loading and keeps its 4-bit copy, the second loads
    the copy and trains the same losses; loaded directly, the copy's dequantized weights and logits equal those of
    the base quantized afresh."""
    require_gpus(1)
    r = child("copy", tmp_path)
    assert r["sources"] == ["quantized while loading", "4-bit copy"], r
    assert r["copies"] == 1 and r["copy_has_weights"]
    assert r["direct_sources"] == ["quantized while loading", "4-bit copy"], r
    assert r["layers"] > 0 and r["weights_equal"], r
    assert r["logits_max_diff"] <= 1e-3 * max(r["logits_scale"], 1.0), r
    first, second = r["losses"]
    assert len(first) == len(second) == 3 and all(math.isfinite(x) for x in first + second)
    assert second[0] == pytest.approx(first[0], rel=1e-3) and second == pytest.approx(first, rel=2e-2)


@pytest.mark.gpu
def test_two_ranks_over_nccl_train_what_one_does(tmp_path):
    """Two processes, one GPU each, NCCL (the launcher the handler uses, through train_lora's command line): the same
    steps, tokens and losses (within bf16) as one process, a peak memory figure from each GPU, one adapter."""
    count, found = visible_gpus()
    if count < 2:
        pytest.skip(f"needs 2 CUDA GPUs (NCCL cannot run 2 ranks on one GPU): {found}")
    r = child("ddp", tmp_path)
    one, two = r["one"], r["two"]
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["device"] == "cuda"
    assert len(two["peak_memory_gb_per_gpu"]) == 2 and all(p > 0 for p in two["peak_memory_gb_per_gpu"])
    assert (two["steps"] == one["steps"] and two["trained_tokens"] == one["trained_tokens"]
            and two["tokens"] == one["tokens"])
    assert r["losses_two"][0] == pytest.approx(r["losses_one"][0], rel=1e-2)
    assert r["losses_two"] == pytest.approx(r["losses_one"], rel=5e-2)
    assert two["validation_loss"] == pytest.approx(one["validation_loss"], rel=5e-2)
    assert r["adapter_files"]


def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    """scripts/gpu_check.py where no GPU is visible (here, and in any test process: conftest hides the GPUs): a clear
    message, exit status 2, nothing written."""
    out = tmp_path / "gpu-check.json"
    before = sorted((ROOT / "bench" / "results").glob("gpu-check-*"))
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--json", str(out)], cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no CUDA GPU" in run.stdout and "not yet measured" in run.stdout and "Traceback" not in run.stderr
    assert not out.exists() and sorted((ROOT / "bench" / "results").glob("gpu-check-*")) == before


# ---------------------------------------------------------------------------- in the child processes

def _skip(reason: str):
    print(reason, flush=True)
    raise SystemExit(SKIP)


def _setup(work: Path):
    """The child's start: the project importable, CUDA there (else SKIP), the tiny Qwen2 model built."""
    sys.path.insert(0, str(ROOT))
    import torch

    if not torch.cuda.is_available():
        _skip(f"no CUDA device visible to the child (torch {torch.__version__}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    from tiny_model import build_tiny_model

    return build_tiny_model("qwen2", work / "tiny-qwen2")


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _same_lora_weights(models: dict) -> list[str]:
    """The same LoRA weights in each model, B not zero (at zero its gradients would say little): their names."""
    import torch

    first = next(iter(models.values()))
    names = [n for n, p in first.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            shape = dict(first.named_parameters())[name].shape
            value = torch.randn(shape, generator=generator) * (0.1 if "lora_B" in name else 0.5)
            for model in models.values():
                dict(model.named_parameters())[name].copy_(value)
    return names


def _packed_rows(vocab: int) -> list:
    """Two packed rows crossing flex attention's 128-token blocks, each example a prompt that is not trained and
    then trained tokens."""
    import torch

    from chat_labels import IGNORE, Example

    g = torch.Generator().manual_seed(1)
    sequences = []
    for row in [[100, 60, 90], [130, 70, 40]]:
        sequence = []
        for n in row:
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            sequence.append(Example(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
        sequences.append(sequence)
    return sequences


def check_flex(work: Path) -> dict:
    import torch

    base = _setup(work)
    from chat_labels import collate
    from device import select_attention
    from job import Hyperparameters
    from loss import loss_sum
    from model_loading import load_model

    if select_attention("cuda", 4, True, True) != "flex_attention":
        _skip("flex attention is not chosen on this machine (it needs triton and a C compiler): the worker trains "
              "packed batches with sdpa's dense mask here")
    hp = Hyperparameters(lora_rank=8, lora_dropout=0.0)
    models = {"sdpa": load_model(base, hp, "cuda", torch.bfloat16, attention="sdpa", recompute=False)[0],
              "flex": load_model(base, hp, "cuda", torch.bfloat16, attention="flex_attention", recompute=False)[0],
              "flex_recompute": load_model(base, hp, "cuda", torch.bfloat16, attention="flex_attention",
                                           recompute=True)[0]}
    names = _same_lora_weights(models)
    sequences = _packed_rows(models["sdpa"].get_output_embeddings().weight.shape[0])
    pad = 0
    flex_batch = collate(sequences, pad, "cuda", attention="flex_attention", pad_to=256)
    sdpa_batch = collate(sequences, pad, "cuda", attention="sdpa", pad_to=256)
    assert flex_batch["input_ids"].shape == sdpa_batch["input_ids"].shape == (2, 256)
    length = sdpa_batch["input_ids"].shape[1]
    leaky_mask = torch.tril(torch.ones(length, length, dtype=torch.bool, device="cuda")).expand(2, 1, length, length)
    leaky_batch = {**sdpa_batch, "attention_mask": leaky_mask}  # causal over the whole row: examples see each other

    def gradients(model, batch):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, batch)
        loss.backward()
        torch.cuda.synchronize()
        return float(loss.detach()), {n: p.grad.detach().float().clone()
                                      for n, p in model.named_parameters() if p.requires_grad}

    def compare(loss, grads, ref_loss, ref_grads):
        flat, ref = torch.cat([grads[n].flatten() for n in names]), torch.cat([ref_grads[n].flatten() for n in names])
        return {"loss": loss, "loss_rel": abs(loss - ref_loss) / abs(ref_loss), "grad_rel": _relative(flat, ref),
                "worst_param_rel": max(_relative(grads[n], ref_grads[n]) for n in names),
                "grad_cosine": float(torch.nn.functional.cosine_similarity(flat, ref, dim=0))}

    ref_loss, ref_grads = gradients(models["sdpa"], sdpa_batch)
    result = {"attention": "flex_attention", "mask": type(flex_batch["attention_mask"]).__name__, "sdpa_loss": ref_loss,
              "trained_tokens": flex_batch["trained_tokens"]}
    for name in ("flex", "flex_recompute"):
        result[name] = compare(*gradients(models[name], flex_batch), ref_loss, ref_grads)
    result["leaky"] = compare(*gradients(models["sdpa"], leaky_batch), ref_loss, ref_grads)
    with torch.no_grad():  # the evaluation's path: eval mode, no gradients (flex compiles it apart)
        losses = {}
        for name, batch in (("sdpa", sdpa_batch), ("flex", flex_batch)):
            models[name].eval()
            losses[name] = float(loss_sum(models[name], batch))
    result["eval_loss_rel"] = abs(losses["flex"] - losses["sdpa"]) / abs(losses["sdpa"])
    return result


def check_train(work: Path, dtype: str) -> dict:
    import torch
    from safetensors.torch import load_file

    base = _setup(work)
    from dataset_loader import load_dataset
    from job import Hyperparameters
    from train_lora import train

    conversations = load_dataset(SAMPLE)[0][:12]
    hp = Hyperparameters(compute_dtype=dtype, learning_rate=1e-3, batch_size=2, epochs=4, lora_rank=8, lora_alpha=256,
                         lora_dropout=0.0, max_seq_length=1024, warmup_steps=2, val_fraction=0.2)
    out = work / "adapter"
    metrics = train(conversations, base, out, hp).metrics
    history = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    by_epoch: dict[int, list[float]] = {}
    for record in history:
        by_epoch.setdefault(record["epoch"], []).append(record["loss"])
    saved = load_file(out / "adapter_model.safetensors")
    return {"metrics": {k: metrics[k] for k in ("device", "compute_dtype", "steps", "peak_memory_gb", "attention",
                                                "train_loss_first", "train_loss_last", "validation_loss")},
            "losses": [r["loss"] for r in history],
            "validation_losses": [r["validation_loss"] for r in history if "validation_loss" in r],
            "epoch_means": [sum(v) / len(v) for _, v in sorted(by_epoch.items())],
            "saved_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in saved.values()}),
            "saved_finite": all(bool(torch.isfinite(t).all()) for t in saved.values()),
            "lora_b_nonzero": any(bool((t != 0).any()) for k, t in saved.items() if "lora_B" in k),
            "files": sorted(p.name for p in out.iterdir())}


def check_copy(work: Path) -> dict:
    import bitsandbytes as bnb
    import torch

    base = _setup(work)
    from dataset_loader import load_dataset
    from job import Hyperparameters
    from model_loading import load_base_model
    from train_lora import train

    cache = work / "models" / ".quantized"  # where the handler keeps it: <MODEL_CACHE_DIR>/.quantized
    conversations = load_dataset(SAMPLE)[0][:8]
    hp = Hyperparameters(max_steps=3, batch_size=2, max_seq_length=512, lora_rank=4, lora_dropout=0.0, val_fraction=0,
                         packing=False, warmup_steps=0, learning_rate=1e-3)
    jobs = []
    for name in ("first", "second"):
        metrics = train(conversations, base, work / name, hp, quantized_cache=cache).metrics
        history = [json.loads(line) for line in (work / name / "training_log.jsonl").read_text().splitlines()]
        jobs.append((metrics, [r["loss"] for r in history]))
    copies = [p for p in cache.iterdir()]
    dtype = getattr(torch, jobs[0][0]["compute_dtype"])
    fresh, fresh_source = load_base_model(base, "cuda", dtype)
    kept, kept_source = load_base_model(base, "cuda", dtype, quantized_cache=cache)
    layers = {n: m for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    kept_layers = {n: m for n, m in kept.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    equal = layers.keys() == kept_layers.keys() and all(
        torch.equal(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state),
                    bnb.functional.dequantize_4bit(kept_layers[n].weight.data, kept_layers[n].weight.quant_state))
        for n, m in layers.items())
    ids = torch.randint(3, 2000, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = fresh(input_ids=ids).logits.float(), kept(input_ids=ids).logits.float()
    return {"sources": [m["base_weights"] for m, _ in jobs], "losses": [losses for _, losses in jobs],
            "copies": len(copies), "copy_has_weights": bool(copies and list(copies[0].glob("*.safetensors"))),
            "direct_sources": [fresh_source, kept_source], "layers": len(layers), "weights_equal": bool(equal),
            "logits_max_diff": float((a - b).abs().max()), "logits_scale": float(a.abs().max())}


def check_ddp(work: Path) -> dict:
    import torch

    base = _setup(work)
    if torch.cuda.device_count() < 2:
        _skip(f"needs 2 CUDA GPUs, {torch.cuda.device_count()} visible")
    args = ["--dataset", str(SAMPLE), "--base-model", str(base), "--max-seq-length", "512", "--lora-rank", "4",
            "--lora-dropout", "0", "--batch-size", "4", "--learning-rate", "1e-3", "--warmup-steps", "1",
            "--max-steps", "6", "--val-fraction", "0.2"]
    figures = {}
    for name, processes in (("one", 1), ("two", 2)):
        run = subprocess.run([sys.executable, "train_lora.py", "train", "--output", str(work / name),
                              "--processes", str(processes), *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=CHILD_TIMEOUT_S - 60)
        if run.returncode != 0:
            raise SystemExit(f"{processes} process(es) failed:\n{run.stderr[-4000:]}")
        figures[name] = json.loads(run.stdout)
        figures[f"losses_{name}"] = [json.loads(line)["loss"] for line in
                                     (work / name / "training_log.jsonl").read_text().splitlines()]
    keep = ("world_size", "device", "peak_memory_gb_per_gpu", "steps", "trained_tokens", "tokens", "validation_loss",
            "attention", "compute_dtype")
    return {"one": {k: figures["one"][k] for k in keep}, "two": {k: figures["two"][k] for k in keep},
            "losses_one": figures["losses_one"], "losses_two": figures["losses_two"],
            "adapter_files": sorted(p.name for p in (work / "two").iterdir())}


CHECKS = {"flex": check_flex, "train": check_train, "copy": check_copy, "ddp": check_ddp}

if __name__ == "__main__":
    check, work, *rest = sys.argv[1:]
    figures = CHECKS[check](Path(work), *rest)
    print(json.dumps(figures), flush=True)
