"""The device a job trains on: its GPUs as NVML sees them (no CUDA context taken), whether this image's torch
runs on them, the precision and attention they allow, free and peak memory, and the autocast and loss scaling
the training step uses.

torch and pynvml are imported inside the functions that use them: the handler imports this module, starts in
about 2 s without them, and would take about 6 s more with torch, transformers, peft and bitsandbytes loaded.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import resource
import shutil


def gpu_facts() -> list[dict]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES), as NVML sees them: `name`, `capability` (major, minor),
    `free_bytes`, `total_bytes`. Read without creating a CUDA context (which would hold ~0.5 GB of GPU 0 for the
    worker's life); [] where there is no GPU or no NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU to describe
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # indices or UUIDs, in the order CUDA numbers them
            by_uuid = {str(pynvml.nvmlDeviceGetUUID(h)): h for h in handles}
            wanted = [v.strip() for v in visible.split(",") if v.strip()]
            handles = [handles[int(v)] if v.isdigit() and int(v) < len(handles) else by_uuid.get(v) for v in wanted]
            handles = handles[:handles.index(None)] if None in handles else handles  # CUDA stops at the first bad one
        facts = []
        for handle in handles:
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            facts.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                          "capability": tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                          "free_bytes": int(memory.free), "total_bytes": int(memory.total)})
        return facts
    except Exception:  # noqa: BLE001 - a driver too old for a call: report nothing rather than fail
        return []
    finally:
        pynvml.nvmlShutdown()


def unsupported_gpu() -> str | None:
    """Why the installed torch cannot run on this worker's GPU (it has no kernels for its compute capability), or
    None. A GPU runs kernels built for its own major version and a minor at or below its own, or PTX at or below."""
    import torch

    facts, archs = gpu_facts(), torch.cuda.get_arch_list()
    matches = (re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch) for arch in archs)
    built = [(m[1], int(m[2]), int(m[3])) for m in matches if m]
    if not facts or not built:
        return None
    for gpu in facts:
        major, minor = gpu["capability"]
        if not any(kind == "sm" and m == major and n <= minor or kind == "compute" and (m, n) <= (major, minor)
                   for kind, m, n in built):
            sass = sorted((m, n) for kind, m, n in built if kind == "sm")
            return (f"this worker's GPU ({gpu['name']}, compute capability {major}.{minor}) cannot run this image's "
                    f"torch {torch.__version__}, built for compute capability {sass[0][0]}.{sass[0][1]} to "
                    f"{sass[-1][0]}.{sass[-1][1]}: choose other GPU types for the endpoint (V100, T4, A10, A40, A100, "
                    "L4, L40S, H100 and H200 are in that range)")
    return None


def gpu_capability() -> tuple[int, int]:
    """The first visible GPU's compute capability: from NVML, or from torch where NVML cannot say."""
    import torch

    facts = gpu_facts()
    return facts[0]["capability"] if facts else torch.cuda.get_device_capability()


def select_precision(setting: str = "auto"):
    """(device, compute dtype): for "auto", bf16 on GPUs with compute capability >= 8.0, fp16 below, fp32 on the
    CPU; another setting names the dtype (bf16 on the CPU runs the GPU's 16-bit path there, for tests)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if setting != "auto":
        return device, getattr(torch, setting)
    if device == "cuda":
        major, _ = gpu_capability()
        return "cuda", torch.bfloat16 if major >= 8 else torch.float16
    return "cpu", torch.float32


def free_gpu_memory_gb(device: str) -> float | None:
    """GiB free on this process's GPU, for the fit check (`architecture.check_fits`); None on the CPU (no limit)."""
    if device != "cuda":
        return None
    import torch

    if torch.cuda.is_initialized():  # a training process, on its own GPU
        gc.collect()  # a warm worker's previous job may still hold memory (reference cycles, cached blocks)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] / 1024**3
    # the handler, before any download: NVML, no CUDA context taken for the worker's life
    return (gpu_facts() or [{"free_bytes": torch.cuda.mem_get_info()[0]}])[0]["free_bytes"] / 1024**3


FP16_INIT_SCALE = 2.0**16  # the loss scale fp16 training starts from (torch's default); halved after each overflow


def autocast(device: str, compute_dtype):
    """The forward pass (and so the backward) in the compute dtype: the 4-bit layers' matmuls already are, and under
    autocast the LoRA layers' are too (PEFT casts an adapted layer's input to its fp32 weights only without autocast,
    and keeps that fp32 copy for backward: twice the activation memory the estimate counts). Off in fp32."""
    import torch

    return torch.autocast(device_type=device, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


def loss_scaler(device: str, compute_dtype):
    """Dynamic loss scaling for fp16 (GPUs without bf16, or `compute_dtype: float16`): the loss is divided by the
    batch's trained tokens, and its gradients would underflow fp16 and vanish without it. A step whose gradients
    overflow is skipped and the scale halved; it doubles again after 2,000 clean steps. A no-op otherwise."""
    import torch

    return torch.amp.GradScaler(device, init_scale=FP16_INIT_SCALE, enabled=compute_dtype == torch.float16)


def select_attention(device: str, micro_batch_size: int, packing: bool, supports_flex: bool) -> str:
    """How attention keeps packed examples apart, computing only within each one where the GPU allows it:
    flash-attention 2 where it is installed and micro-batches hold one sequence (transformers 5.23 separates
    packed examples by position_ids, its varlen path, only at batch size 1); else on a GPU PyTorch's flex
    attention with a document mask (`collate`'s BlockMask; compiled by Triton, which needs a C compiler), for
    the architectures transformers supports it on (`supports_flex`; not Qwen3-Next in 5.23);
    else sdpa with a block-diagonal 4D mask, which computes every pair and masks them (the CPU: flex attention
    has no backward there)."""
    if device == "cuda" and micro_batch_size == 1 and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    flex = importlib.util.find_spec("triton") and (shutil.which("cc") or shutil.which("gcc"))
    return "flex_attention" if device == "cuda" and packing and supports_flex and flex else "sdpa"


def free_memory(device: str) -> None:
    """Give back what a dropped model held: `del` alone does not (bitsandbytes' 4-bit weights point back at their
    layers: a reference cycle only a garbage collection breaks), nor does it return the cached blocks to the GPU."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def gpu_utilization(device: str) -> float | None:
    """Percent of time the GPU was busy over the last sample period (needs NVML); None on CPU."""
    if device != "cuda":
        return None
    import torch

    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - NVML missing or unsupported: report nothing rather than fail
        return None


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
