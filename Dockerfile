# RunPod serverless worker: QLoRA fine-tuning of chat adapters.
# Base: the official Docker "python" image, Python 3.11 as in the test virtualenv, on Debian 12 (bookworm,
# the OS the project is developed and tested on). The tag is patch-pinned (3.11.16, not the floating 3.11)
# so that a rebuild gets the same interpreter under the same pinned wheels; it is listed in
# docker-library/official-images (library/python, since 2026-08-13), and Docker Hub keeps superseded
# official tags pullable. Bump it deliberately to pick up Python and Debian security fixes.
# torch is PyTorch's CUDA 12.6 build, torch==2.13.0+cu126, from PyTorch's own index (download.pytorch.org/whl/cu126),
# not PyPI's torch==2.13.0, whose Linux wheel is the CUDA 13.0 build (2.13.0+cu130: NVIDIA driver >= 580, no Volta).
# It brings the CUDA 12.6 user-space libraries as pip packages (cuBLAS, cuDNN, NCCL ...); the GPU driver comes from
# the host and must be >= 560 (CUDA 12.6): RunPod's hosts on drivers 560-575 (CUDA 12.6-12.9) and newer ones.
# GPUs: compute capability 7.0 and up (V100, T4, A10, A40, A100, L4, L40S, H100, H200); not Blackwell (B200,
# RTX 50xx: their kernels are only in PyTorch's CUDA 12.8+ builds). requirements.txt pins torch==2.13.0, which the
# installed 2.13.0+cu126 satisfies (PEP 440: a pin without a local label ignores the candidate's), so its install
# keeps this torch. Every Python dependency installs as a wheel.
# Re-check the resolved set without Docker: scripts/check_image_deps.sh. At run time the dataset is
# downloaded, and a base model not yet on the network volume (ALLOW_MODEL_DOWNLOAD, on by default).
FROM python:3.11.16-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/runpod-volume/huggingface \
    JOBS_DIR=/runpod-volume/lora-jobs \
    MODEL_CACHE_DIR=/runpod-volume/models

WORKDIR /app

# A C compiler: Triton (torch's compiler for flex attention, the packed-sequence attention on the GPU) builds a
# small launcher for its kernels with it at run time. Without one the worker falls back to sdpa with a dense mask.
# Debian stable's point releases move these versions, so they are not pinned (the base image tag is).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, in cached layers of their own. torch first and alone (the largest download: a change to
# requirements.txt does not fetch it again): the CUDA 12.6 build of requirements.txt's torch pin, with its
# dependencies, from PyTorch's index (tests/test_container.py checks that the versions agree).
RUN pip install --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0+cu126

# Then every pin of requirements.txt from PyPI (torch==2.13.0 is already met). Then fail the build unless torch is
# still the CUDA 12.6 build of the pinned version, the GPU stack imports (no GPU at build time: import only), and
# bitsandbytes ships the library it loads under CUDA 12.6 (its own choice, asked for CUDA 12.6 on a Volta GPU).
COPY requirements.txt .
RUN pip install -r requirements.txt \
 && python -c "import sys, torch; \
pin = [l.split('==')[1].strip() for l in open('requirements.txt') if l.startswith('torch==')][0]; \
want = pin + '+cu126'; \
torch.__version__ == want and torch.version.cuda == '12.6' or sys.exit(f'torch {torch.__version__} (CUDA {torch.version.cuda}) is not {want}, the CUDA 12.6 build of the pinned {pin}'); \
import bitsandbytes, transformers, peft, runpod, postgrest, storage3; \
from bitsandbytes.cextension import get_cuda_bnb_library_path; \
from bitsandbytes.cuda_specs import CUDASpecs; \
lib = get_cuda_bnb_library_path(CUDASpecs(highest_compute_capability=(7, 0), cuda_version_string='126', cuda_version_tuple=(12, 6))); \
lib.name == 'libbitsandbytes_cuda126.so' and lib.is_file() or sys.exit(f'bitsandbytes {bitsandbytes.__version__} has no CUDA 12.6 library: it would load {lib}'); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| bitsandbytes', bitsandbytes.__version__, lib.name)"

COPY handler.py progress.py results.py job.py settings.py storage.py app_row.py archive.py dataset_loader.py chat_formats.py chat_templates.py chat_labels.py labelled_data.py architecture.py model_hub.py checkpoints.py files.py model_loading.py device.py plan.py loss.py adapter.py distributed.py serving.py train_lora.py tiny_model.py compat.py ./
COPY data/ data/

CMD ["python", "-u", "handler.py"]
