"""What the worker learns about its GPUs without taking a CUDA context (NVML), the GPUs it refuses before any
download, NCCL's shared memory, and where compiled kernels are kept. The machines here have no GPU: NVML is
replaced by a stand-in module describing GPUs (the driver is outside what is tested), and torch's list of the
architectures it was built for by the lists real builds carry."""

import os
import shutil
import sys
from importlib.metadata import version
from types import SimpleNamespace

import pytest
import torch

import device
import distributed
import handler
from conftest import SAMPLE
from settings import WorkerSettings

CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch 2.13.0+cu126


class FakeNvml:
    """pynvml's calls the worker makes, answering for `gpus` (name, uuid, capability, free, total)."""

    def __init__(self, gpus):
        self.gpus, self.initialised = gpus, 0

    def nvmlInit(self):
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetName(self, h):
        return h["name"].encode()  # older bindings answer bytes

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h["capability"]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(free=h["free"], total=h["total"])


GPUS = [{"name": "NVIDIA A40", "uuid": "GPU-aaaa", "capability": (8, 6), "free": 47 << 30, "total": 48 << 30},
        {"name": "Tesla P100-PCIE-16GB", "uuid": "GPU-bbbb", "capability": (6, 0), "free": 15 << 30, "total": 16 << 30},
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-cccc", "capability": (9, 0), "free": 79 << 30,
         "total": 80 << 30}]


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml(GPUS)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_without_nvml_nothing_is_reported_and_nothing_fails():
    assert device.gpu_facts() == []  # this machine: no driver, so NVML's library is not found
    assert device.unsupported_gpu() is None


def test_gpus_are_read_through_nvml_in_the_order_cuda_visible_devices_gives(nvml, monkeypatch):
    facts = device.gpu_facts()
    assert [f["name"] for f in facts] == ["NVIDIA A40", "Tesla P100-PCIE-16GB", "NVIDIA H100 80GB HBM3"]
    assert facts[0] == {"name": "NVIDIA A40", "capability": (8, 6), "free_bytes": 47 << 30, "total_bytes": 48 << 30}
    assert nvml.initialised == 0  # shut down again
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [f["name"] for f in device.gpu_facts()] == ["NVIDIA H100 80GB HBM3", "NVIDIA A40"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,7,0")  # CUDA stops at the first entry it cannot find
    assert [f["name"] for f in device.gpu_facts()] == ["Tesla P100-PCIE-16GB"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device.gpu_facts() == []


@pytest.mark.parametrize("visible, archs, refused", [
    ("0", CU126_ARCHS, None),  # A40 (8.6) runs sm_80 and sm_86 kernels
    ("2", ["sm_80"], "NVIDIA H100 80GB HBM3, compute capability 9.0"),  # SASS runs on its own major version only
    ("1", ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], "Tesla P100-PCIE-16GB, compute capability 6.0"),
    ("2", ["sm_70", "sm_80", "sm_86"], "NVIDIA H100 80GB HBM3, compute capability 9.0"),
    ("2", ["sm_70", "sm_80", "compute_80"], None),  # PTX for 8.0 is compiled for the 9.0 GPU at load time
], ids=["a40-cu126", "h100-sm80-only", "p100-no-sm6", "h100-no-sm9", "h100-ptx"])
def test_a_gpu_the_installed_torch_has_no_kernels_for_is_named(nvml, monkeypatch, visible, archs, refused):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    why = device.unsupported_gpu()
    if refused is None:
        assert why is None
    else:
        assert why.startswith(f"this worker's GPU ({refused}) cannot run this image's torch {torch.__version__}")
        assert "choose other GPU types for the endpoint" in why


def test_an_unsupported_gpu_fails_the_job_before_any_download(nvml, monkeypatch, storage, tiny_qwen2, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the P100
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU126_ARCHS[2:])
    for name, value in {"JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
                        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(name, value)
    result = handler.handler({"id": "gpu-1",
                              "input": {"job_id": "old-gpu", "dataset_url": storage.url(SAMPLE.name, storage.good),
                                        "hyperparameters": {"base_model": str(tiny_qwen2)}}})
    assert result["error"].startswith("loading_model: this worker's GPU (Tesla P100-PCIE-16GB, compute capability 6.0)")
    assert storage.hits[SAMPLE.name] == 0


def test_a_small_dev_shm_turns_nccls_shared_memory_off_for_several_ranks(monkeypatch):
    monkeypatch.setenv("NCCL_SHM_DISABLE", "")  # unset for the worker; put back as it was after the test
    monkeypatch.setattr(distributed, "_shm_disabled_here", False)
    sizes = {"/dev/shm": 64 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=sizes[str(path)]))
    assert distributed.shared_memory_note(1) is None  # one process: no NCCL
    note = distributed.shared_memory_note(2)
    assert note.startswith("/dev/shm holds only 64 MB") and "NCCL_SHM_DISABLE=1" in note and "--shm-size" in note
    assert os.environ["NCCL_SHM_DISABLE"] == "1"
    assert distributed.shared_memory_note(2) == note  # said for every job, though the worker set the variable
    sizes["/dev/shm"] = 2 << 30
    monkeypatch.setattr(distributed, "_shm_disabled_here", False)
    monkeypatch.delenv("NCCL_SHM_DISABLE")
    assert distributed.shared_memory_note(2) is None
    sizes["/dev/shm"] = 64 << 20
    monkeypatch.setenv("NCCL_SHM_DISABLE", "0")  # the deployment decided
    assert distributed.shared_memory_note(2) is None


def test_compiled_kernels_are_kept_on_the_volume_per_torch_version(tmp_path):
    settings = WorkerSettings.from_env({"MODEL_CACHE_DIR": str(tmp_path / "volume" / "models")})
    env = settings.compile_cache_env()
    root = tmp_path / "volume" / "compile-cache" / f"torch-{version('torch')}"
    assert env == {"TRITON_CACHE_DIR": str(root / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    assert (root / "triton").is_dir() and (root / "inductor").is_dir()
    (tmp_path / "not-a-directory").write_text("")  # a volume that cannot hold them: the compilers' own default
    assert WorkerSettings.from_env(
        {"MODEL_CACHE_DIR": str(tmp_path / "not-a-directory" / "models")}).compile_cache_env() == {}
