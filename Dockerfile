# RunPod serverless worker: QLoRA fine-tuning of chat adapters.
# Base: the official Docker "python" image, Python 3.11 as in the test virtualenv, on Debian 12 (bookworm,
# the OS the project is developed and tested on). The tag is patch-pinned (3.11.16, not the floating 3.11)
# so that a rebuild gets the same interpreter under the same pinned wheels; it is listed in
# docker-library/official-images (library/python, since 2026-08-13), and Docker Hub keeps superseded
# official tags pullable. Bump it deliberately to pick up Python and Debian security fixes.
# torch==2.13.0 comes from PyPI: its Linux x86_64 wheel is the CUDA 13.0 build (2.13.0+cu130) and brings
# the CUDA user-space libraries as pip packages (cuda-toolkit==13.0.3, cuDNN, NCCL); the GPU driver
# (>= 580 for CUDA 13) comes from the host. Every Python dependency installs as a wheel.
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

# Dependencies first, in their own cached layer. Then fail the build unless torch is the version
# requirements.txt pins, built for CUDA 13.0, and the GPU stack imports (no GPU at build time: import only).
COPY requirements.txt .
RUN pip install -r requirements.txt \
 && python -c "import sys, torch; pin = [l.split('==')[1].strip() for l in open('requirements.txt') if l.startswith('torch==')][0]; ok = torch.__version__.split('+')[0] == pin and torch.version.cuda == '13.0'; ok or sys.exit(f'torch {torch.__version__} (CUDA {torch.version.cuda}) is not the pinned {pin} CUDA 13.0 build'); import bitsandbytes, transformers, peft, runpod, postgrest, storage3; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY handler.py job.py storage.py app_row.py archive.py dataset_loader.py chat_labels.py base_models.py checkpoints.py files.py model_loading.py distributed.py train_lora.py tiny_model.py ./
COPY data/ data/

CMD ["python", "-u", "handler.py"]
