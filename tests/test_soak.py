"""Many short jobs, good and bad, back to back through one worker process under the SDK's local API
server (loopback only, bounded): memory and open files stay flat, every job ends COMPLETED or FAILED
with its reason, and no job's files leak into another's directory."""

import json
import os
import time

import pytest

from conftest import SAMPLE, running_worker, runsync

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

ROUNDS = 6


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_soak_many_jobs_one_worker(tmp_path, storage, tiny_qwen2):
    (storage.root / "broken.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    good = {"base_model": str(tiny_qwen2), "max_steps": 1, "max_seq_length": 256, "lora_rank": 4}
    kinds = {
        "ok": ({"dataset_url": storage.url(SAMPLE.name, storage.good), "hyperparameters": good}, "COMPLETED", None),
        "expired": ({"dataset_url": storage.url(SAMPLE.name, storage.old), "hyperparameters": good}, "FAILED",
                    "expired"),
        "missing": ({"dataset_url": storage.url("nope.jsonl", storage.good), "hyperparameters": good}, "FAILED",
                    "not found"),
        "broken": ({"dataset_url": storage.url("broken.jsonl", storage.good), "hyperparameters": good}, "FAILED",
                   "no usable example"),
        "invalid": ({"dataset_url": "https://x/y", "hyperparameters": {"learning_rate": 9}}, "FAILED",
                    "invalid job input"),
    }
    samples, started = [], time.monotonic()
    with running_worker(tmp_path) as worker:
        pid = worker.proc.pid
        for round_ in range(ROUNDS):
            for kind, (job, status, reason) in kinds.items():
                job_id = f"soak-{round_}-{kind}"
                result = runsync(worker, {**job, "job_id": job_id})
                assert result["status"] == status, (job_id, result)
                if reason:
                    assert reason in result["error"], (job_id, result["error"])
                samples.append((job_id, rss_mb(pid), open_files(pid)))
    jobs = len(samples)
    first_ok = next(i for i, s in enumerate(samples) if s[0].endswith("-ok"))
    rss_after_first, rss_last = samples[first_ok][1], samples[-1][1]
    files_after_first, files_last = samples[first_ok][2], samples[-1][2]
    figures = {"jobs": jobs, "failures_injected": jobs - ROUNDS, "seconds": round(time.monotonic() - started, 1),
               "rss_mb_after_first_training_job": round(rss_after_first), "rss_mb_last": round(rss_last),
               "open_files_after_first_training_job": files_after_first, "open_files_last": files_last}
    print("soak:", json.dumps(figures))
    assert files_last - files_after_first <= 3, samples
    assert rss_last - rss_after_first < 150, samples

    # each job's files are in its own directory, and only its own
    for job_dir in (tmp_path / "jobs").iterdir():
        log = (job_dir / "job.log").read_text() if (job_dir / "job.log").exists() else ""
        others = [s[0] for s in samples if s[0] != job_dir.name and s[0] in log]
        assert not others, (job_dir.name, others)
        assert (job_dir / "adapter").is_dir() == job_dir.name.endswith("-ok"), job_dir.name
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted(
        s[0] for s in samples if not s[0].endswith("-invalid"))
