"""The app's deployed (pipeline) flow, end to end: the worker writes the app's job row and metrics (a real PostgreSQL
holding the app's own migration, behind tests/supabase_server.py's PostgREST and Storage), delivers the one archive
the app's deployer unpacks, stops when the user cancels, and survives the database going away. Jobs run through the
SDK's local API server (`running_worker`), or `python handler.py --test_input` where a SIGTERM must reach the handler
(the SDK's real worker loop, like its local mode, runs the handler on the main thread; its API server does not)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import ROOT, SAMPLE, running_worker, runsync
from model_loading import quantization_config, same_kernels_in_eval
from test_archive import deployer_unpack

pytestmark = pytest.mark.slow  # end to end: `make test-fast` leaves it out

TEAM_ENV = {  # what the app's team sets beside Supabase (shared/contracts/brightrun-app.md): ignored, with a warning
    "S3_ENDPOINT_URL": "https://s3api-eu-ro-1.runpod.io", "S3_ACCESS_KEY_ID": "user_abc",
    "S3_SECRET_ACCESS_KEY": "rps_x", "NETWORK_VOLUME_ID": "vol-123"}
ROW_COLUMNS = "status, progress, current_epoch, current_step, total_steps, current_loss, current_learning_rate, " \
              "tokens_per_second, started_at, updated_at, completed_at, final_loss, training_time_seconds, " \
              "adapter_file_path, error_message, error_details"


def new_row(supabase, status="initializing") -> str:
    job_id = str(uuid.uuid4())
    supabase.sql("INSERT INTO pipeline_training_jobs (id, job_name, status, runpod_job_id) VALUES (%s, %s, %s, %s)",
                 (job_id, "e2e", status, "rp-1"))
    return job_id


def row(supabase, job_id) -> dict:
    [found] = supabase.sql(f"SELECT {ROW_COLUMNS} FROM pipeline_training_jobs WHERE id = %s", (job_id,))
    return found


def metric_rows(supabase, job_id) -> list[dict]:
    return supabase.sql("SELECT metric_id, value, step_number, epoch_number FROM pipeline_training_metrics "
                        "WHERE job_id = %s ORDER BY step_number, metric_id", (job_id,))


def dataset_url(supabase, data: bytes = None) -> str:
    supabase.put_object("training-files", "user-1/dataset.jsonl", data if data is not None else SAMPLE.read_bytes())
    return supabase.sign("training-files", "user-1/dataset.jsonl", expires_in=3600)


def job(job_id, url, base_model, **hyperparameters) -> dict:
    return {"job_id": job_id, "dataset_url": url,
            "hyperparameters": {"base_model": str(base_model), "learning_rate": 1e-3, "batch_size": 2, "epochs": 2,
                                "rank": 8, "alpha": 16, "max_seq_length": 256, **hyperparameters},
            "gpu_config": {"type": "NVIDIA A40", "count": 1}}


class RowWatcher:
    """Every state the row passes through (status, progress), read every 20 ms while the job runs."""

    def __init__(self, supabase, job_id):
        self.seen, self._stop = [], threading.Event()

        def watch():
            while True:
                stopping = self._stop.is_set()  # one more reading after the job's end
                state = supabase.sql("SELECT status, progress FROM pipeline_training_jobs WHERE id = %s", (job_id,))[0]
                if not self.seen or self.seen[-1] != (state["status"], state["progress"]):
                    self.seen.append((state["status"], state["progress"]))
                if stopping:
                    return
                time.sleep(0.02)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()

    def stop(self) -> list:
        self._stop.set()
        self.thread.join()
        return self.seen


def submit(worker, job_input) -> dict:
    """runsync from a thread: {"result": ...} once it answers."""
    answer = {}

    def post():
        try:
            answer["result"] = runsync(worker, job_input)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            answer["error"] = exc

    threading.Thread(target=post, daemon=True).start()
    return answer


def wait_for(predicate, timeout=180, what="", log=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}"
        time.sleep(0.05)


def test_a_job_moves_its_row_to_completed_and_the_archive_deploys_and_loads(supabase, tiny_qwen2, tmp_path):
    job_id = new_row(supabase)
    with running_worker(tmp_path, **supabase.env, **TEAM_ENV, PROGRESS_INTERVAL_S="0.2",
                        SERVING_MAX_LORA_RANK="16") as worker:
        assert "S3_ENDPOINT_URL points at RunPod's network-volume S3 API" in worker.log.read_text()  # a warning
        watcher = RowWatcher(supabase, job_id)
        result = runsync(worker, job(job_id, dataset_url(supabase), tiny_qwen2, max_seq_length=1024))
        seen = watcher.stop()
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    statuses = [status for status, _ in seen]
    assert statuses[0] == "initializing" and statuses[-1] == "completed"
    assert set(statuses) == {"initializing", "running", "completed"}
    assert statuses.index("completed") > max(i for i, s in enumerate(statuses) if s == "running")
    progress = [p for _, p in seen]
    assert all(isinstance(p, int) for p in progress) and progress[-1] == 100 and len(set(progress)) > 3
    final, metrics = row(supabase, job_id), output["metrics"]
    archive_path = f"lora-models/adapters/{job_id}.tar.gz"
    assert final["adapter_file_path"] == archive_path and final["status"] == "completed" and final["progress"] == 100
    assert (final["current_step"] == final["total_steps"] == metrics["steps"]
            and final["current_epoch"] == metrics["epochs"])
    assert final["final_loss"] == pytest.approx(metrics["train_loss_kept"])  # the delivered epoch's, the best of two
    for column in ("current_loss", "current_learning_rate", "tokens_per_second", "started_at", "updated_at",
                   "completed_at", "training_time_seconds"):
        assert final[column] is not None, column
    assert final["started_at"] < final["completed_at"] and final["error_message"] is None
    assert output["app_row"] == {"table": "pipeline_training_jobs", "id": job_id, "written": True,
                                 "status": "completed"}
    assert any("S3_ENDPOINT_URL points at RunPod's network-volume S3 API" in w for w in output["warnings"])
    assert not any("vLLM" in w for w in output["warnings"])  # checked against the endpoint's rules: it loads

    rows = metric_rows(supabase, job_id)
    per_metric = {m: [r for r in rows if r["metric_id"] == m]
                  for m in ("training_loss", "learning_rate", "gradient_norm", "validation_loss")}
    assert [r["step_number"] for r in per_metric["training_loss"]] == list(range(1, metrics["steps"] + 1))
    assert len(per_metric["learning_rate"]) == len(per_metric["gradient_norm"]) == metrics["steps"]
    assert [r["epoch_number"] for r in per_metric["validation_loss"]] == [1, 2]  # one held-out conversation, each epoch
    kept = min(per_metric["validation_loss"], key=lambda r: r["value"])
    assert (kept["epoch_number"], kept["value"]) == (metrics["best_epoch"], pytest.approx(metrics["validation_loss"]))

    # The archive, as the app's deployer gets it: downloaded from the bucket, one leading folder stripped
    data = supabase.objects[("lora-models", f"adapters/{job_id}.tar.gz")]
    assert output["adapter_archive"]["storage_path"] == archive_path and output["adapter_archive"]["bytes"] == len(data)
    assert requests.get(output["adapter_archive"]["url"], timeout=30).content == data  # the signed link works
    files = deployer_unpack(data)
    adapter = tmp_path / "deployed"
    adapter.mkdir()
    for name, content in files.items():
        (adapter / name).write_bytes(content)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "generation_config.json",
                 "training_config.json", "metrics.json"):
        assert name in files, name
    base = same_kernels_in_eval(AutoModelForCausalLM.from_pretrained(
        tiny_qwen2, quantization_config=quantization_config(torch.float32), dtype=torch.float32).eval())
    ids = torch.tensor([[5, 17, 99, 312, 7, 1000]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    assert (after - before).abs().max() > 1e-4
    print(f"archive of the sample job: {len(data)} bytes")


def test_a_bad_dataset_ends_the_row_failed_with_the_message(supabase, tiny_qwen2, tmp_path):
    job_id = new_row(supabase)
    with running_worker(tmp_path, **supabase.env) as worker:
        result = runsync(worker, job(job_id, dataset_url(supabase, b'{"nothing": "usable"}\nnot json\n'), tiny_qwen2))
    assert result["status"] == "FAILED" and result["error"].startswith("loading_data: ")
    final = row(supabase, job_id)
    assert final["status"] == "failed" and final["error_message"] == result["error"]
    assert final["error_details"] == {"stage": "loading_data", "runpod_job_id": result["id"],
                                      "written_by": "brightrun-lora-worker", "resumable": False}
    assert final["completed_at"] is not None and metric_rows(supabase, job_id) == []


def test_cancel_in_the_app_stops_training_within_a_step_and_uploads_nothing(supabase, tiny_qwen2, tmp_path):
    job_id = new_row(supabase)
    with running_worker(tmp_path, **supabase.env, PROGRESS_INTERVAL_S="0.2") as worker:
        answer = submit(worker, job(job_id, dataset_url(supabase), tiny_qwen2, epochs=20, max_steps=400, batch_size=1,
                                    checkpoint_steps=100000))
        wait_for(lambda: (row(supabase, job_id)["current_step"] or 0) >= 3, what="step 3", log=worker.log)
        # the app's Cancel
        supabase.sql("UPDATE pipeline_training_jobs SET status = 'cancelled' WHERE id = %s", (job_id,))
        wait_for(lambda: "result" in answer or "error" in answer, what="the job's end", log=worker.log)
        log = worker.log.read_text()
    result = answer["result"]
    assert result["status"] == "FAILED", result
    assert result["error"].startswith("training: the app ended this job (the user cancelled it; "
                                      "pipeline_training_jobs id=")
    assert "a checkpoint was saved" in result["error"]
    # within one optimizer step of the worker seeing the cancel: at most one step logged after it
    seen = log.index("the app's job row is now 'cancelled'")
    assert len(re.findall(r" step \d+/\d+ epoch ", log[seen:])) <= 1, log[seen:]
    checkpoints = list((tmp_path / "jobs" / job_id / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 400
    assert row(supabase, job_id)["status"] == "cancelled"  # left as the user set it
    assert not any(key[0] == "lora-models" for key in supabase.objects)  # nothing uploaded
    assert not (tmp_path / "jobs" / job_id / "adapter").exists()


def test_sigterm_mid_training_leaves_the_row_failed_with_the_resume_message_and_a_checkpoint(supabase, tiny_qwen2,
                                                                                             tmp_path):
    job_id = new_row(supabase)
    env = os.environ | supabase.env | {"JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
                                       "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true", "PROGRESS_INTERVAL_S": "0.2"}
    payload = {"id": "rp-sigterm", "input": job(job_id, dataset_url(supabase), tiny_qwen2, epochs=20, max_steps=400,
                                                batch_size=1, checkpoint_steps=100000)}
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "handler.py", "--test_input", json.dumps(payload)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (row(supabase, job_id)["current_step"] or 0) >= 2, what="step 2", log=log_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    final = row(supabase, job_id)
    assert final["status"] == "failed", log_path.read_text()[-3000:]
    assert final["error_message"].startswith("training: the worker was asked to stop (SIGTERM) at step ")
    assert "a checkpoint was saved: resubmit the same job to resume" in final["error_message"]
    assert final["error_details"]["resumable"] is True and final["error_details"]["runpod_job_id"] == "rp-sigterm"
    assert list((tmp_path / "jobs" / job_id / "checkpoints").glob("checkpoint-*"))


def test_an_expired_link_is_read_from_the_apps_storage_and_another_hosts_is_not(supabase, storage, tiny_qwen2,
                                                                                tmp_path):
    job_id = new_row(supabase)
    url = dataset_url(supabase)
    supabase.expire(url)  # the job waited in RunPod's queue past the link's hour
    with running_worker(tmp_path, **supabase.env) as worker:
        result = runsync(worker, job(job_id, url, tiny_qwen2, max_steps=2, epochs=1))
        assert result["status"] == "COMPLETED", result
        assert any("signed link had expired" in w for w in result["output"]["warnings"])
        assert ("GET", "/storage/v1/object/authenticated/training-files/user-1/dataset.jsonl") in [
            r[:2] for r in supabase.requests]
        assert row(supabase, job_id)["status"] == "completed"
        # a link to another host that has expired is not read with the service key: the job fails as expired
        other = new_row(supabase)
        refused = runsync(worker, job(other, storage.url(SAMPLE.name, storage.old), tiny_qwen2, max_steps=2))
        assert refused["status"] == "FAILED" and "dataset URL has expired" in refused["error"]
        # nor another object with that expired token (Storage checks a token's expiry before the path it names)
        supabase.put_object("training-files", "user-2/private.jsonl", SAMPLE.read_bytes())
        elsewhere = new_row(supabase)
        moved = runsync(worker, job(elsewhere, url.replace("user-1/dataset.jsonl", "user-2/private.jsonl"), tiny_qwen2,
                                    max_steps=2))
        assert moved["status"] == "FAILED" and "dataset URL has expired" in moved["error"]
        # nor a link to this host refused for another reason (a forged token)
        forged = new_row(supabase)
        bad = runsync(worker, job(forged, url.split("?")[0] + "?token=forged", tiny_qwen2, max_steps=2))
        assert bad["status"] == "FAILED" and "signature is invalid" in bad["error"]
    authenticated = [r for r in supabase.requests if r[1].startswith("/storage/v1/object/authenticated/")]
    assert len(authenticated) == 1
    assert row(supabase, other)["status"] == row(supabase, forged)["status"] == "failed"


def test_the_database_down_for_part_of_a_job_costs_no_training_and_the_final_state_lands(supabase, tiny_qwen2,
                                                                                         tmp_path):
    job_id = new_row(supabase)
    with running_worker(tmp_path, **supabase.env, PROGRESS_INTERVAL_S="0.2", SUPABASE_WRITE_DEADLINE_S="1") as worker:
        answer = submit(worker, job(job_id, dataset_url(supabase), tiny_qwen2, max_steps=12, batch_size=1, epochs=4))
        wait_for(lambda: (row(supabase, job_id)["current_step"] or 0) >= 2, what="step 2", log=worker.log)
        supabase.rest_down(mode="reset")
        wait_for(lambda: " step 12/12 " in worker.log.read_text(), what="the last step", log=worker.log)
        time.sleep(2)  # the final write is being retried now
        assert "result" not in answer and row(supabase, job_id)["status"] == "running"
        supabase.rest_up()
        wait_for(lambda: "result" in answer or "error" in answer, what="the job's end", log=worker.log)
    result = answer["result"]
    assert result["status"] == "COMPLETED", result
    assert result["output"]["metrics"]["steps"] == 12 and result["output"]["app_row"]["written"] is True
    final = row(supabase, job_id)
    assert final["status"] == "completed" and final["adapter_file_path"] == f"lora-models/adapters/{job_id}.tar.gz"
    # the metrics buffered while the database was away were written once it was back
    assert [r["step_number"] for r in metric_rows(supabase, job_id)
            if r["metric_id"] == "training_loss"] == list(range(1, 13))


def test_a_wrong_key_fails_before_any_download_and_is_logged_at_start(supabase, tiny_qwen2, tmp_path):
    job_id = new_row(supabase)
    with running_worker(tmp_path, **(supabase.env | {"SUPABASE_SERVICE_ROLE_KEY": "not-the-service-key"})) as worker:
        assert "SUPABASE_SERVICE_ROLE_KEY is not accepted" in worker.log.read_text()
        url = dataset_url(supabase)
        result = runsync(worker, job(job_id, url, tiny_qwen2))
    assert result["status"] == "FAILED"
    assert result["error"].startswith("starting: the app's database refused the read of job row ")
    assert ("SUPABASE_SERVICE_ROLE_KEY is not accepted" in result["error"]
            and "Nothing was downloaded" in result["error"])
    assert not any(r[1].startswith("/storage/v1/object/sign/") and r[0] == "GET" for r in supabase.requests)
    assert row(supabase, job_id)["status"] == "initializing"


def test_a_job_without_a_row_completes_with_a_warning(supabase, tiny_qwen2, tmp_path):
    job_id = str(uuid.uuid4())  # no row (a legacy-flow job, or a local run against the app's project)
    with running_worker(tmp_path, **supabase.env) as worker:
        result = runsync(worker, job(job_id, dataset_url(supabase), tiny_qwen2, max_steps=2, epochs=1))
    assert result["status"] == "COMPLETED", result
    output = result["output"]
    assert any("the app's job row does not exist" in w for w in output["warnings"])
    assert (output["app_row"]["written"] is False
            and output["adapter_archive"]["storage_path"].endswith(f"{job_id}.tar.gz"))
    assert supabase.sql("SELECT count(*) AS n FROM pipeline_training_jobs")[0]["n"] == 0


def test_a_job_the_app_cancelled_while_queued_is_not_run(supabase, tiny_qwen2, tmp_path):
    job_id = new_row(supabase, status="cancelled")
    with running_worker(tmp_path, **supabase.env) as worker:
        result = runsync(worker, job(job_id, dataset_url(supabase), tiny_qwen2))
    assert result["status"] == "FAILED"
    assert result["error"].startswith("starting: the app has ended this job before it started (the user cancelled it")
    assert row(supabase, job_id)["status"] == "cancelled"
    assert not any(r[1].startswith("/storage/v1/object/sign/") and r[0] == "GET" for r in supabase.requests)


def test_an_input_the_worker_refuses_still_ends_the_apps_row(supabase, tiny_qwen2, tmp_path):
    """A setting out of range, and a rank the serving endpoint (SERVING_MAX_LORA_RANK) would refuse: both in the
    job's first second, before anything is downloaded."""
    job_id, too_large = new_row(supabase), new_row(supabase)
    with running_worker(tmp_path, **supabase.env, SERVING_MAX_LORA_RANK="16") as worker:
        result = runsync(worker, job(job_id, dataset_url(supabase), tiny_qwen2, learning_rate=0.5))
        refused = runsync(worker, job(too_large, dataset_url(supabase), tiny_qwen2, rank=32))
    assert result["error"] == "validating: invalid job input: hyperparameters.learning_rate=0.5 is above 0.001"
    assert refused["error"].startswith("validating: the adapter could not be served: rank: lora_rank 32 exceeds the "
                                       "serving endpoint's max_lora_rank 16 (SERVING_MAX_LORA_RANK): set lora_rank to "
                                       "16 or less, or raise the endpoint's max_lora_rank (vLLM v0.")
    for job_id, answer in ((job_id, result), (too_large, refused)):
        final = row(supabase, job_id)
        assert final["status"] == "failed" and final["error_message"] == answer["error"]
        assert final["error_details"]["stage"] == "validating"
    assert not any(r[1].startswith("/storage/v1/object/sign/") and r[0] == "GET" for r in supabase.requests)
