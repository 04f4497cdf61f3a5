"""Cold start: time and memory to get a base model into 4-bit, three ways, each in a fresh process.

    stock     transformers' own path: `AutoModelForCausalLM.from_pretrained(..., load_in_4bit)`; for
              fused-MoE models (Qwen3-Next) the experts stay 16-bit
    ours      the worker's path: MoE experts as per-expert layers, quantized one tensor at a time while loading
    copy      the worker's 4-bit copy of the model (kept on the volume after a model's first job)

On CPU the models are small random-weight ones built from the configs below (the files sit in the
page cache, so times are quantization and copying, not volume reads: the bytes each way reads are
reported instead). On a GPU (`--configs data/model-configs/qwen2.5-7b.json ...`) the real
architectures are built with random weights. Memory: peak allocated CUDA memory on a GPU; on CPU the
process's anonymous memory (RssAnon: the model, not the mapped files) after loading, after
returning freed heap memory to the system (malloc_trim), and at its peak sampled every 2 ms. Each
measuring process runs with glibc's mmap threshold fixed at 128 KiB, so that a freed tensor's
memory goes back to the system at once and the sampled peak follows the memory really in use
(with glibc's adaptive threshold, the freed 16-bit expert tensors stay in the heap and the peak
reads like the stock path's).

    .venv/bin/python bench/bench_load.py [--json bench/results/load-cpu-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small enough for a CPU, shaped like the real ones: most parameters in the experts / MLP.
CPU_CONFIGS = {
    "moe (qwen3_next, 64 experts)": dict(
        model_type="qwen3_next", hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=1024, vocab_size=8192, num_experts=64, num_experts_per_tok=4,
        moe_intermediate_size=256, shared_expert_intermediate_size=256, linear_num_key_heads=4,
        linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
        full_attention_interval=4),
    "dense (qwen2)": dict(
        model_type="qwen2", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
        intermediate_size=2816, vocab_size=32768),
}


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def measure(way: str, model_dir: str, copy_root: str) -> dict:
    """One way of loading, in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM

    from device import select_precision
    from model_loading import load_base_model, quantization_config

    device, dtype = select_precision()
    peak, done = [_anon_kib()], threading.Event()
    baseline = peak[0]

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], _anon_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if way == "stock":
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(dtype),
                                                     dtype=dtype, device_map={"": 0} if device == "cuda" else None)
        source = "stock"
    else:
        model, source = load_base_model(Path(model_dir), device, dtype, quantized_cache=Path(copy_root))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    result = {"way": way, "source": source, "load_seconds": round(seconds, 2), "device": device}
    if device == "cuda":
        result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    result["anon_after_load_mb"] = round((_anon_kib() - baseline) / 1024)
    result["anon_peak_mb"] = round((peak[0] - baseline) / 1024)
    # glibc keeps freed heap memory (here: each expert's fp32 tensor, freed once quantized) unless trimmed;
    # after a trim, what remains is what the model holds
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    result["anon_after_trim_mb"] = round((_anon_kib() - baseline) / 1024)
    four_bit = sum(p.numel() * p.element_size() * 2 for p in model.parameters() if type(p).__name__ == "Params4bit")
    total = four_bit + sum(p.numel() for p in model.parameters() if type(p).__name__ != "Params4bit")
    result["fraction_in_4bit"] = round(four_bit / total, 3)
    return result


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def build(name: str, spec: dict | Path, root: Path) -> Path:
    """A random-weight model from a config, saved once (in the compute dtype of this machine)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from device import select_precision

    _, dtype = select_precision()
    config = json.loads(Path(spec).read_text()) if isinstance(spec, Path) else dict(spec)
    config = AutoConfig.for_model(**config)
    out = root / name.split()[0]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", type=Path, help="config.json files (default: the small CPU models)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(*args._measure)))
        return 0

    specs = {p.stem: p for p in args.configs} if args.configs else CPU_CONFIGS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in specs.items():
            model_dir = build(name, spec, Path(tmp))
            copy_root = Path(tmp) / "copies" / model_dir.name
            for way in ("stock", "ours", "copy"):  # "ours" also writes the copy that "copy" then loads
                if way == "ours":
                    started = time.perf_counter()
                run = subprocess.run([sys.executable, __file__, "--_measure", way if way != "copy" else "ours",
                                      str(model_dir), str(copy_root)], capture_output=True, text=True, cwd=ROOT,
                                     env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
                if run.returncode != 0:
                    raise SystemExit(f"{name} / {way} failed:\n{run.stderr[-3000:]}")
                row = {"model": name, **json.loads(run.stdout.strip().splitlines()[-1])}
                row["way"] = way
                if way == "ours":
                    row["with_saving_the_copy_seconds"] = round(time.perf_counter() - started, 2)
                row["bytes_read_mb"] = round(
                    _dir_bytes(next(copy_root.iterdir()) if way == "copy" else model_dir) / 1e6, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(model_dir)  # one model on disk at a time (a 7B model is ~15 GB, its copy ~5 GB)
            shutil.rmtree(copy_root)

    import torch

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "bitsandbytes")},
        "rows": rows,
    }
    print(f"\n{'model':30} {'way':6} {'4-bit':>6} {'load s':>7} {'read MB':>8} {'anon after MB':>14} "
          f"{'after trim MB':>14} {'anon peak MB':>13}"
          + (f" {'peak GPU GB':>12}" if torch.cuda.is_available() else ""))
    for r in rows:
        print(f"{r['model']:30} {r['way']:6} {r['fraction_in_4bit']:6.1%} {r['load_seconds']:7.2f} "
              f"{r['bytes_read_mb']:8.1f} {r['anon_after_load_mb']:14d} {r['anon_after_trim_mb']:14d} "
              f"{r['anon_peak_mb']:13d}" + (f" {r['peak_allocated_gb']:12.2f}" if "peak_allocated_gb" in r else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
