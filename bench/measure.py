"""What the benchmarks and the GPU check measure with: the machine's description, freed GPU memory between runs, the
peak memory of a CPU run, a bf16 matmul peak, the 6·N FLOPs' N of a model, and a real architecture built from its
config with random weights.

torch and transformers are imported inside the functions that use them: `bench_train.py --help` and the GPU check's
"no GPU here" answer need neither.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import time
from importlib.metadata import version
from pathlib import Path


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    for lib in ("torch", "transformers", "peft", "bitsandbytes"):
        info[lib] = version(lib)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info["driver"] = None
    return info


def fresh_gpu_memory() -> float | None:
    """Start a run from freed GPU memory: whatever the previous run left unreferenced (reference cycles
    of its model and optimizer) collected, the caching allocator's free blocks given back, the peak
    reset. Returns the GB still allocated (a leftover would show here), or None without CUDA."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 1024**3


def model_flops_parameters(model_dir: Path) -> int:
    """N of the 6·N FLOPs per token: the parameters less the input embedding (a lookup, not a matmul)."""
    from architecture import count_parameters, load_config

    p = count_parameters(load_config(Path(model_dir)))
    return p["total"] - p["embeddings"] + p["vocab"] * p["hidden"]


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def matmul_peak_tflops() -> float | None:
    """The best of 5 timings of 100 bf16 8192² matmuls (~1 s on an H100, long enough for the clocks
    to settle), after a warm-up of 20."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for _ in range(20):
        torch.matmul(a, b, out=out)
    best, n = float("inf"), 100
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192**3 * n / best / 1e12


def build_random_model(config_file: Path, tokenizer_dir: Path, out: Path) -> Path:
    """A real architecture from its config.json with random weights (no download), saved with the
    tiny model's tokenizer (its ids are valid in the larger vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(**json.loads(config_file.read_text()))
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
