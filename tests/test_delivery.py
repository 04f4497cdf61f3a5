"""Where the adapter's files go, and deployments whose files the app could not download refused before any work:
RunPod's volume S3 API, an endpoint with no storage, a bucket that is not there, a store that does not honour
presigned links. Real parts on loopback: the SDK's API server, moto's S3 server, a signed-URL dataset server."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import handler
from conftest import S3_KEYS, SAMPLE, running_worker, runsync

RUNPOD_S3 = "https://s3api-eu-ro-1.runpod.io"


def job(storage, job_id, tiny_qwen2):
    return {"job_id": job_id, "dataset_url": storage.url(SAMPLE.name, storage.good),
            "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "batch_size": 2, "max_seq_length": 256}}


def test_runpods_volume_s3_api_is_refused_when_the_worker_starts_and_no_job_downloads(tmp_path, storage, tiny_qwen2):
    env = {"S3_ENDPOINT_URL": RUNPOD_S3, **S3_KEYS, "NETWORK_VOLUME_ID": "abc123xyz", "RUNPOD_ENDPOINT_ID": "ep-test"}
    with running_worker(tmp_path, **env) as worker:
        started = worker.log.read_text()
        assert "worker settings: S3_ENDPOINT_URL points at RunPod's network-volume S3 API" in started
        result = runsync(worker, job(storage, "runpod-s3", tiny_qwen2))
    assert result["status"] == "FAILED"
    error = result["error"]
    assert error.startswith("worker settings: S3_ENDPOINT_URL points at RunPod's network-volume S3 API "
                            "(s3api-eu-ro-1.runpod.io), which does not support presigned URLs")
    assert "NETWORK_VOLUME_ID='abc123xyz' is not read" in error and "supabase.co/storage/v1/s3" in error
    assert storage.hits[SAMPLE.name] == 0 and not (tmp_path / "jobs" / "runpod-s3").exists()


@pytest.fixture
def handler_env(tmp_path, monkeypatch):
    """The handler in this process, with the environment of a worker."""
    for key in list(__import__("os").environ):
        if key.startswith(("S3_", "BUCKET_", "RUNPOD_ENDPOINT_ID", "VOLUME_DELIVERY")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    return handler, monkeypatch


def test_an_endpoint_with_no_storage_fails_in_its_first_second_naming_the_variables(handler_env, storage, tiny_qwen2):
    handler, env = handler_env
    env.setenv("RUNPOD_ENDPOINT_ID", "ep-test")
    result = handler.handler({"id": "r1", "input": job(storage, "no-storage", tiny_qwen2)})
    assert result["error"].startswith("worker settings: no storage for the adapter's files")
    for variable in ("S3_ENDPOINT_URL", "S3_BUCKET", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY",
                     "VOLUME_DELIVERY=true"):
        assert variable in result["error"]
    assert storage.hits[SAMPLE.name] == 0


def test_volume_delivery_says_where_the_files_are_and_offers_no_links(handler_env, storage, tiny_qwen2, tmp_path):
    handler, env = handler_env
    env.setenv("RUNPOD_ENDPOINT_ID", "ep-test")
    env.setenv("VOLUME_DELIVERY", "true")
    result = handler.handler({"id": "r2", "input": job(storage, "on-volume", tiny_qwen2)})
    assert "error" not in result, result
    adapter = tmp_path / "jobs" / "on-volume" / "adapter"
    assert "model_files" not in result and "download_urls" not in result
    assert result["volume_files"] == {p.name: str(p) for p in sorted(adapter.iterdir())}
    assert any(f"on the network volume at {adapter}" in w for w in result["warnings"])
    again = handler.handler({"id": "r3", "input": job(storage, "on-volume", tiny_qwen2)})  # the stored result
    assert again["volume_files"] == result["volume_files"] and "model_files" not in again


def test_a_missing_bucket_is_found_before_the_dataset_is_downloaded(handler_env, storage, tiny_qwen2, s3):
    handler, env = handler_env
    for key, value in {"S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "no-such-bucket", **S3_KEYS}.items():
        env.setenv(key, value)
    result = handler.handler({"id": "r4", "input": job(storage, "no-bucket", tiny_qwen2)})
    assert result["error"].startswith("starting: the adapter's storage refused a test upload to bucket "
                                      "'no-such-bucket'")
    assert "NoSuchBucket" in result["error"] and "Nothing was downloaded or trained" in result["error"]
    assert storage.hits[SAMPLE.name] == 0 and S3_KEYS["S3_SECRET_ACCESS_KEY"] not in result["error"]


class _NoPresignStore(BaseHTTPRequestHandler):
    """An S3 API that stores uploads but refuses every presigned GET (as RunPod's volume S3 API does): the
    worker must find out before it trains, not the app after."""

    objects: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        self.objects[self.path.split("?")[0]] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(200, headers={"ETag": '"0"'})

    def do_DELETE(self):
        self.objects.pop(self.path.split("?")[0], None)
        self._reply(204)

    def do_GET(self):
        self._reply(403, b"<Error><Code>AccessDenied</Code><Message>presigned URLs are not supported</Message></Error>",
                    {"Content-Type": "application/xml"})


def test_a_store_whose_presigned_links_do_not_work_is_refused_before_any_work(handler_env, storage, tiny_qwen2):
    handler, env = handler_env
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoPresignStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key, value in {"S3_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
                           "S3_BUCKET": "lora-models", **S3_KEYS}.items():
            env.setenv(key, value)
        result = handler.handler({"id": "r5", "input": job(storage, "no-presign", tiny_qwen2)})
    finally:
        server.shutdown()
        server.server_close()
    assert result["error"].startswith("starting: a presigned download link from bucket 'lora-models' at ")
    assert ("does not return the file it signs (HTTP 403)" in result["error"]
            and "supabase.co/storage/v1/s3" in result["error"])
    assert storage.hits[SAMPLE.name] == 0
    assert _NoPresignStore.objects == {}  # the check's test file was deleted again


def test_a_stored_result_is_delivered_as_the_deployment_now_delivers(handler_env, storage, tiny_qwen2, s3, tmp_path):
    """A job that completed with its files on the volume, submitted again once S3 storage is set: the app gets
    presigned links that download the same bytes, never a volume path or a file:// link."""
    handler, env = handler_env
    env.setenv("RUNPOD_ENDPOINT_ID", "ep-test")
    env.setenv("VOLUME_DELIVERY", "true")
    first = handler.handler({"id": "r6", "input": job(storage, "redeliver", tiny_qwen2)})
    assert "volume_files" in first and "model_files" not in first
    env.delenv("VOLUME_DELIVERY")
    for key, value in {"S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "lora-models", **S3_KEYS}.items():
        env.setenv(key, value)
    again = handler.handler({"id": "r7", "input": job(storage, "redeliver", tiny_qwen2)})
    assert "error" not in again and "volume_files" not in again
    assert any("already completed" in w for w in again["warnings"])
    adapter = tmp_path / "jobs" / "redeliver" / "adapter"
    assert set(again["model_files"]) == {p.name for p in adapter.iterdir()}
    for name, url in again["model_files"].items():
        assert url.startswith(s3[0]) and requests.get(url, timeout=30).content == (adapter / name).read_bytes()
