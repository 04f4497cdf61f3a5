"""The job contract with the BrightRun app, on loopback with real parts: the SDK's local API server
runs the handler, datasets come from a signed-URL server, the adapter goes to an S3 API server
(moto in server mode) whose presigned URLs are downloaded over HTTP, progress goes to a recorder.
The progress reporter alone is tested against a webhook on a real socket (the end-to-end tests are `slow`).
The job's directory: one that is a link is refused, links planted in it are never followed."""

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from runpod.serverless.modules import rp_http

import handler
import progress
from conftest import ROOT, S3_KEYS, SAMPLE, running_worker, runsync
from storage import EXPIRED
from test_archive import deployer_unpack

APP_STAGES = {"downloading", "loading_data", "loading_model", "training", "saving", "uploading"}
PREFIX = "runpod-worker/adapters"  # the app's own bucket, under a prefix the deployment chooses
APP_METRICS = {"training_loss", "validation_loss", "learning_rate", "throughput", "gpu_utilization", "gradient_norm"}
CALLBACK_SECRET = "cb-secret-51c2"

SHAPE_A = {"hyperparameters": {"learning_rate": 1e-3, "batch_size": 2, "epochs": 1, "rank": 8, "alpha": 16,
                               "dropout": 0.05},
           "gpu_config": {"type": "NVIDIA A100 80GB", "count": 2}}
SHAPE_B = {"hyperparameters": {"learning_rate": 1e-3, "batch_size": 2, "num_epochs": 1, "lora_rank": 8,
                               "lora_alpha": 16, "lora_dropout": 0.05, "warmup_steps": 1, "weight_decay": 0.01},
           "gpu_config": {"gpu_type": "NVIDIA A100 80GB", "num_gpus": 2, "gpu_memory_gb": 80,
                          "cost_per_gpu_hour": 1.89}}


@pytest.fixture(scope="module")
def worker(tmp_path_factory, s3, recorder):
    env = {"S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "lora-models", "S3_PREFIX": PREFIX, **S3_KEYS,
           "PROGRESS_INTERVAL_S": "0", "RUNPOD_WEBHOOK_POST_OUTPUT": recorder.url("/progress?id=$ID")}
    with running_worker(tmp_path_factory.mktemp("worker"), **env) as w:
        yield w


@pytest.mark.slow  # end to end: `make test-fast` leaves it out
@pytest.mark.parametrize("shape", [SHAPE_A, SHAPE_B], ids=["shape-A", "shape-B"])
def test_a_job_reports_progress_and_returns_files_the_app_can_download(shape, worker, storage, recorder, s3,
                                                                        tiny_qwen2):
    job_id = f"contract-{'A' if shape is SHAPE_A else 'B'}"
    job = {"job_id": job_id, "dataset_url": storage.url(SAMPLE.name, storage.good),
           "callback_url": recorder.url(f"/callback?sig={CALLBACK_SECRET}"), "gpu_config": shape["gpu_config"],
           "hyperparameters": {**shape["hyperparameters"], "base_model": str(tiny_qwen2), "max_seq_length": 512,
                               "max_steps": 3}}
    result = runsync(worker, job)
    assert result["status"] == "COMPLETED", result
    output = result["output"]

    # progress: exactly the fields the app reads, at every stage it shows
    updates = [body for path, body in recorder.posts if path.startswith(f"/progress?id={result['id']}&")]
    assert updates and all(u["status"] == "IN_PROGRESS" for u in updates)
    assert_progress_as_the_app_reads_it([u["output"] for u in updates], output)

    # every model_files URL downloads, without credentials, the same bytes as the adapter's files
    adapter = worker.jobs / job_id / "adapter"
    local = {p.name: p.read_bytes() for p in adapter.iterdir()}
    assert_the_app_downloads_the_adapter(output, local, job_id, s3)

    meta = output["model_metadata"]
    assert (meta["gpu_config"]["count"], meta["gpu_config"]["type"]) == (2, "NVIDIA A100 80GB")
    assert any("asked for 2 GPU(s)" in w for w in output["warnings"])
    assert meta["dataset"]["examples"] == 44 and meta["seconds"]["upload"] >= 0 and meta["final_loss"] > 0
    assert not any("unknown input key" in w for w in output["warnings"])  # both shapes are fully understood

    # the same job again: its stored result, with freshly signed links that still download the same bytes
    again = runsync(worker, {**job, "callback_url": None})
    assert again["status"] == "COMPLETED" and any("already completed" in w for w in again["output"]["warnings"])
    url = again["output"]["model_files"]["adapter_config.json"]
    assert requests.get(url, timeout=30).content == local["adapter_config.json"]

    # the callback got the final status once
    callbacks = [body for path, body in recorder.posts
                 if path.startswith("/callback") and body.get("id") == result["id"]]
    assert len(callbacks) == 1 and callbacks[0]["status"] == "COMPLETED"


def assert_progress_as_the_app_reads_it(payloads: list[dict], output: dict) -> None:
    assert {p["stage"] for p in payloads} >= APP_STAGES
    for p in payloads:
        assert set(p) - {"metrics"} == {"progress", "current_epoch", "current_step", "total_steps", "stage"}
        assert 0 <= p["progress"] <= 100 and set(p.get("metrics", {})) <= APP_METRICS
    # once training has started, every update has numbers in the columns the app stores as NOT NULL
    started = payloads[[p["stage"] for p in payloads].index("training"):]
    assert not any("metrics" in p for p in payloads[:len(payloads) - len(started)])  # no metrics row before training
    assert {p["stage"] for p in started} == {"training", "saving", "uploading"}
    for p in started:
        numbers = [p["metrics"]["training_loss"], p["metrics"]["learning_rate"], p["current_epoch"], p["current_step"]]
        assert all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers), p
        assert p["current_step"] >= 1 and p["total_steps"] == 3
    assert {"throughput", "gradient_norm"} <= set(started[0]["metrics"])
    # a validation loss by default (one of the sample's 12 conversations held out): sent once, with the update that
    # measured it (training stopped mid-epoch at max_steps: the final weights', as saving starts), and in the result
    measured = [p for p in started if "validation_loss" in p["metrics"]]
    assert [p["stage"] for p in measured] == ["saving"]
    assert measured[0]["metrics"]["validation_loss"] == output["metrics"]["validation_loss"] > 0
    assert output["metrics"]["validation_conversations"] == 1
    assert [p["progress"] for p in payloads] == sorted(p["progress"] for p in payloads)


def assert_the_app_downloads_the_adapter(output: dict, local: dict[str, bytes], job_id: str, s3) -> None:
    assert set(output["model_files"]) == set(local)
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.jsonl", "loss_curve.png"} <= set(local)
    for name, url in output["model_files"].items():
        assert url.startswith(f"{s3[0]}/lora-models/{PREFIX}/{job_id}/{name}?")
        response = requests.get(url, timeout=30)
        assert response.status_code == 200 and response.content == local[name], name
    stored = s3[1].list_objects_v2(Bucket="lora-models", Prefix=f"{PREFIX}/{job_id}/")["Contents"]
    archive = output["adapter_archive"]  # the one archive too, as the app's deployer unpacks it
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in stored) == sorted([*local, f"{job_id}.tar.gz"])  # no check file
    assert archive["name"] == f"{job_id}.tar.gz"
    assert archive["url"].startswith(f"{s3[0]}/lora-models/{PREFIX}/{job_id}/")
    assert deployer_unpack(requests.get(archive["url"], timeout=30).content) == local
    assert output["model_metadata"]["files"] == {name: len(data) for name, data in local.items()}
    assert local["loss_curve.png"][:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # end to end: `make test-fast` leaves it out
def test_expired_url_fails_with_the_expiry_message_and_no_secret_is_logged(worker, storage, recorder, tiny_qwen2):
    result = runsync(worker, {"job_id": "contract-expired", "dataset_url": storage.url(SAMPLE.name, storage.old),
                              "callback_url": recorder.url(f"/callback?sig={CALLBACK_SECRET}"),
                              "hyperparameters": {"base_model": str(tiny_qwen2)}})
    assert result["status"] == "FAILED"
    assert result["error"] == "downloading: " + EXPIRED
    callbacks = [body for path, body in recorder.posts
                 if path.startswith("/callback") and body.get("id") == result["id"]]
    assert callbacks and callbacks[0]["status"] == "FAILED" and "expired" in callbacks[0]["error"]

    logs = worker.log.read_text() + "".join(p.read_text() for p in worker.jobs.glob("*/job.log"))
    progress = json.dumps([body for path, body in recorder.posts if path.startswith("/progress")])
    for secret in (storage.good, storage.old, CALLBACK_SECRET, *S3_KEYS.values()):
        assert secret not in logs, secret
    for secret in (storage.good, storage.old, *S3_KEYS.values()):
        assert secret not in progress, secret


@pytest.mark.slow  # end to end: `make test-fast` leaves it out
def test_importing_the_handler_loads_no_training_library():
    code = ("import sys, handler; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "print(heavy); r = handler.handler({'id': 'x', 'input': {'dataset_url': 'https://h/d?token=t', "
            "'hyperparameters': {'rank': 1}}}); print(r['error'])")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # the field named as sent
    assert run.stdout.splitlines() == ["[]", "validating: invalid job input: hyperparameters.rank=1 is below 4"]


def test_progress_updates_follow_the_apps_columns(monkeypatch):
    """The reporter alone, with the sender recorded: what each update carries, and when it is sent."""
    sent = []
    monkeypatch.setattr(progress, "post_progress", lambda job, payload, timeout_s=None: sent.append(payload) or True)
    report = handler.ProgressReporter({"id": "j"}, enabled=True, interval_s=3600)
    step = {"stage": "training", "total_steps": 4, "epoch": 1, "learning_rate": 1e-4, "tokens_per_second": 900.0,
            "grad_norm": 0.5}
    report({"stage": "downloading"})
    report({"stage": "training", "percent": 0.0, "step": 0, "total_steps": 4, "epoch": 0})  # held: no loss yet
    report({**step, "percent": 25.0, "step": 1, "loss": 2.0})
    report({**step, "percent": 50.0, "step": 2, "loss": 1.8, "validation_loss": 1.9})  # an epoch's end: sent at once
    report({**step, "percent": 75.0, "step": 3, "loss": 1.7})  # within the interval: not sent
    report({"stage": "saving", "validation_loss": 1.85})
    report({"stage": "uploading"})
    report.close()
    assert [p["stage"] for p in sent] == ["downloading", "training", "training", "saving", "uploading"]
    assert "metrics" not in sent[0] and sent[1]["current_step"] == 1 and sent[1]["total_steps"] == 4
    assert sent[2]["metrics"]["validation_loss"] == 1.9 and sent[2]["current_epoch"] == 1
    assert sent[3]["metrics"] == {"training_loss": 1.7, "learning_rate": 1e-4, "validation_loss": 1.85}
    assert sent[4]["metrics"] == {"training_loss": 1.7, "learning_rate": 1e-4} and sent[4]["current_step"] == 3
    # a job resumed from its final checkpoint: the first training update carries the checkpoint's figures
    resumed = handler.ProgressReporter({"id": "k"}, enabled=True, interval_s=3600)
    sent.clear()
    resumed({"stage": "training", "percent": 100.0, "step": 4, "total_steps": 4, "epoch": 2, "loss": 1.6,
             "learning_rate": 0.0})
    resumed({"stage": "saving", "validation_loss": 1.8})
    resumed.close()
    assert [p["stage"] for p in sent] == ["training", "saving"] and sent[1]["metrics"]["training_loss"] == 1.6


@contextmanager
def webhook(answer_first: threading.Event, monkeypatch):
    """RunPod's progress endpoint on a real loopback socket, as the SDK posts to it (RUNPOD_WEBHOOK_POST_OUTPUT):
    yields the stages received, in the order they arrived; the first update is answered once `answer_first` is set."""
    received: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["output"]["stage"] == "downloading":
                answer_first.wait(10)
            received.append(body["output"]["stage"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"http://127.0.0.1:{server.server_address[1]}/done/$ID?gpu=1")
    try:
        yield received
    finally:
        answer_first.set()
        server.shutdown()
        server.server_close()


def test_progress_updates_arrive_in_the_order_they_were_made_without_holding_up_the_job(monkeypatch):
    """The first update is answered late: the job goes on at once, the later updates wait behind it in one daemon
    sender thread (the SDK's thread per update would deliver them first), and close() sends what is queued."""
    answer_first, stages = threading.Event(), ["downloading", "loading_data", "downloading_model", "loading_model"]
    earlier = set(threading.enumerate())
    with webhook(answer_first, monkeypatch) as received:
        report = handler.ProgressReporter({"id": "ordered"}, enabled=True, interval_s=0)
        for stage in stages:
            report({"stage": stage})
        assert received == []  # every update made while the first is unanswered: none waited for the webhook
        senders = [t for t in threading.enumerate() if t.name == "progress-sender" and t not in earlier]
        assert [t.daemon for t in senders] == [True]
        answer_first.set()
        report.close()
        assert received == stages
        assert not senders[0].is_alive()  # stopped at the job's end


def test_the_job_ends_without_waiting_for_a_webhook_that_does_not_answer(monkeypatch):
    """close() waits a bounded time: the job's result goes out even when the last updates cannot."""
    answer_first, earlier = threading.Event(), set(threading.enumerate())
    with webhook(answer_first, monkeypatch) as received:
        report = handler.ProgressReporter({"id": "stuck"}, enabled=True, interval_s=0)
        report({"stage": "downloading"})
        report({"stage": "loading_data"})
        report.close(timeout_s=0.2)
        assert received == [] and not answer_first.is_set()  # returned with both updates still unsent
        answer_first.set()  # the test's own tidying: the sender ends before the endpoint does
        for sender in [t for t in threading.enumerate() if t.name == "progress-sender" and t not in earlier]:
            sender.join(10)


@pytest.mark.slow  # end to end: `make test-fast` leaves it out
def test_an_adapter_the_serving_endpoint_would_refuse_is_delivered_with_the_rule_it_breaks(worker, storage, tiny_qwen2):
    """LoRA on lm_head trains, but vLLM has no LoRA on Qwen2's lm_head: the result says so, naming the rule and the
    vLLM source, and the adapter is still delivered."""
    result = runsync(worker, {"job_id": "contract-lm-head", "dataset_url": storage.url(SAMPLE.name, storage.good),
                              "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "max_seq_length": 256,
                                                  "lora_target_modules": ["q_proj", "lm_head"]}})
    assert result["status"] == "COMPLETED", result
    [warning] = [w for w in result["output"]["warnings"] if "vLLM" in w]
    assert warning.startswith("the serving endpoint (vLLM) may not load this adapter: "
                              "target_modules: LoRA on ['lm_head']")
    assert "vllm/lora/lora_model.py" in warning and "set lora_target_modules" in warning
    assert "adapter_model.safetensors" in result["output"]["model_files"]


@pytest.mark.slow  # trains the tiny model
def test_links_planted_in_a_job_directory_are_never_followed(tiny_qwen2, storage, tmp_path, monkeypatch):
    """Anyone with write access to the volume can plant links where a job writes; the job runs as root. Each link
    here pointed at a file the job must not touch, or at another job's checkpoints, which it must not set aside."""
    for key, value in {"JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(tmp_path / "models"),
                       "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(key, value)
    job_dir, other = tmp_path / "jobs" / "planted", tmp_path / "jobs" / "other-job" / "checkpoints" / "checkpoint-2"
    other.mkdir(parents=True)
    (other / "state.pt").write_bytes(b"another job's state")
    job_dir.mkdir(parents=True)
    victims = {}
    for name in ("dataset.download.part", "dataset.download", "dataset.canonical.jsonl.part", "result.json.tmp",
                 "job.log", "adapter.tmp"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious")
        (job_dir / name).symlink_to(victim)
        victims[name] = victim
    (job_dir / "checkpoints").symlink_to(other.parent)
    result = handler.handler({"id": "p1", "input": {
        "job_id": "planted", "dataset_url": storage.url(SAMPLE.name, storage.good),
        "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "batch_size": 2, "max_seq_length": 256}}})
    assert "error" not in result, result
    assert all(v.read_text() == "precious" for v in victims.values())
    assert (other / "state.pt").read_bytes() == b"another job's state" and not list(other.parent.glob("*.bad"))
    assert not any(p.is_symlink() for p in job_dir.iterdir()) and (job_dir / "adapter").is_dir()


def test_a_job_directory_that_is_a_link_is_refused(tmp_path, monkeypatch, storage):
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
    (tmp_path / "jobs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "jobs" / "linked").symlink_to(tmp_path / "elsewhere")
    result = handler.handler({"id": "p2",
                              "input": {"job_id": "linked", "dataset_url": storage.url(SAMPLE.name, storage.good)}})
    assert result["error"].startswith("starting: the job directory") and "symbolic link" in result["error"]
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_send_that_outlasts_its_timeout_leaves_only_the_newest_update_behind_it(monkeypatch):
    """A webhook that hangs on one update: the updates queued behind it are cut to the newest (the backlog stays
    bounded however long the job runs), and the newest is sent."""
    monkeypatch.setattr(progress, "SEND_TIMEOUT_S", 0.3)
    answer_first = threading.Event()
    with webhook(answer_first, monkeypatch) as received:
        report = handler.ProgressReporter({"id": "hung"}, enabled=True, interval_s=0)
        for stage in ["downloading", "loading_data", "downloading_model", "loading_model"]:
            report({"stage": stage})
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        report.close()
        assert received == ["loading_model"]  # the first still unanswered, the two between dropped


def test_after_close_gives_up_no_update_is_sent_after_the_jobs_result(monkeypatch):
    monkeypatch.setattr(progress, "SEND_TIMEOUT_S", 0.3)
    answer_first, earlier = threading.Event(), set(threading.enumerate())
    with webhook(answer_first, monkeypatch) as received:
        report = handler.ProgressReporter({"id": "late"}, enabled=True, interval_s=0)
        report({"stage": "downloading"})
        report({"stage": "loading_data"})
        report.close(timeout_s=0.1)  # gives up while the first is unanswered
        answer_first.set()
        for sender in [t for t in threading.enumerate() if t.name == "progress-sender" and t not in earlier]:
            sender.join(10)
            assert not sender.is_alive()
        assert "loading_data" not in received  # queued when close() gave up: dropped, never sent after the result
