"""`make demo`: one complete training job through the real RunPod SDK, on this machine.

1. builds the tiny Qwen2-architecture model (random weights, real tokenizer) into .cache/models/;
2. serves the bundled BrightRun sample over a local HTTP server as a Supabase-style signed URL;
3. runs `python handler.py --test_input ...` (the SDK's local mode) with a job shaped like the app's;
4. prints where the adapter is and its metrics.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from signed_url_server import SignedUrlServer  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

MODEL_DIR = ROOT / ".cache" / "models" / "tiny-qwen2"
JOBS_DIR = ROOT / ".cache" / "jobs"


def main() -> int:
    started = time.monotonic()
    if not (MODEL_DIR / "config.json").is_file():
        print(f"building the tiny model into {MODEL_DIR.relative_to(ROOT)} ...", flush=True)
        build_tiny_model("qwen2", MODEL_DIR)
    token = secrets.token_urlsafe(24)
    with SignedUrlServer(ROOT / "data") as storage:
        storage.tokens.add(token)
        job = {"input": {
            "job_id": "demo",
            "retrain": True,  # run it again each time, rather than return the stored result of the last demo
            "dataset_url": storage.url("brightrun-eq12-demo.jsonl", token),
            # shape B of the app's payload (num_epochs, lora_rank, gpu_config.num_gpus)
            "hyperparameters": {"base_model": str(MODEL_DIR), "learning_rate": 1e-3, "batch_size": 4, "num_epochs": 2,
                                "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "max_seq_length": 1024},
            "gpu_config": {"gpu_type": "NVIDIA A100 80GB", "num_gpus": 1},
        }}
        env = os.environ | {"JOBS_DIR": str(JOBS_DIR), "MODEL_CACHE_DIR": str(MODEL_DIR.parent),  # the 4-bit copy too
                            "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
                            "TOKENIZERS_PARALLELISM": "false"}
        print("running: python handler.py --test_input <job> (RunPod SDK, local mode)", flush=True)
        run = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(job)], cwd=ROOT, env=env)
    if run.returncode != 0:
        print(f"demo job FAILED (exit {run.returncode}); see the log above and {JOBS_DIR / 'demo' / 'job.log'}")
        return 1
    adapter = JOBS_DIR / "demo" / "adapter"
    metrics = json.loads((adapter / "metrics.json").read_text())
    print("\n=== demo job COMPLETED")
    print(f"adapter:         {adapter}")
    print(f"files:           {', '.join(sorted(p.name for p in adapter.iterdir()))}")
    print(f"examples:        {metrics['examples']} (packed into {metrics['sequences']} sequences, "
          f"token efficiency {metrics['token_efficiency']:.2f})")
    print(f"steps / epochs:  {metrics['steps']} / {metrics['epochs']}")
    print(f"train loss:      {metrics['train_loss_first']:.4f} -> {metrics['train_loss_last']:.4f}; "
          f"validation loss {metrics['validation_loss']:.4f} on {metrics['validation_examples']} held-out examples "
          f"({metrics['validation_conversations']} conversation(s), by default)")
    print(f"loss chart:      {adapter / 'loss_curve.png'}")
    print(f"throughput:      {metrics['tokens_per_second']:.0f} tokens/s on {metrics['device']} "
          f"({metrics['compute_dtype']})")
    print(f"demo wall time:  {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
