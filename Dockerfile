# RunPod serverless worker: QLoRA fine-tuning of chat adapters.
# The base image supplies CUDA and torch 2.13.0 (the version requirements.txt pins; its CUDA build,
# 2.13.0+cu128, satisfies ==2.13.0, so pip keeps it). At run time only the dataset is downloaded (and a base
# model, only where ALLOW_MODEL_DOWNLOAD=true); models are read from the network volume.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/runpod-volume/huggingface \
    JOBS_DIR=/runpod-volume/lora-jobs \
    MODEL_CACHE_DIR=/runpod-volume/models

WORKDIR /app

# Dependencies first, in their own cached layer; fail the build if the base image's torch drifted.
COPY requirements.txt .
RUN python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 'base image torch ' + torch.__version__ + ' != 2.13.0')" \
 && pip install -r requirements.txt

COPY handler.py job.py storage.py dataset_loader.py chat_labels.py base_models.py checkpoints.py train_lora.py tiny_model.py ./
COPY data/ data/

CMD ["python", "-u", "handler.py"]
