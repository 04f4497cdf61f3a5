"""Hostile input, contained: SSRF (decided without sending traffic off this machine), redirects to
private addresses, path traversal, oversized lines, and secrets that never reach a log or a file."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from runpod.serverless.utils import rp_ssrf

from conftest import S3_KEYS, SAMPLE, running_worker, runsync
from dataset_loader import load_dataset
from job import JobError
from storage import download_dataset


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1"])
def test_non_public_addresses_are_refused(address):
    assert not rp_ssrf.is_safe_address(address)


def test_public_addresses_are_allowed():  # the decision only: nothing is contacted
    assert rp_ssrf.is_safe_address("8.8.8.8") and rp_ssrf.is_safe_address("2606:4700:4700::1111")


class Counting(ThreadingHTTPServer):
    """A loopback server that counts its requests and answers every GET with `answer(handler)`."""

    def __init__(self, host, answer):
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits += 1
                answer(self)

        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def serve_sample(handler):
    body = SAMPLE.read_bytes()
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def guard_on(monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)


def test_a_hostname_resolving_to_a_private_address_is_refused_before_any_connection(tmp_path, guard_on, monkeypatch):
    target = Counting("127.0.0.1", serve_sample)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k)
                        if host == "datasets.example.com" else real(host, *a, **k))  # a stubbed DNS answer
    with pytest.raises(JobError, match="only from public addresses"):
        download_dataset(f"http://datasets.example.com:{target.server_address[1]}/d.jsonl?token=t", tmp_path / "d",
                         max_bytes=10**7, retries=0)
    assert target.hits == 0
    target.shutdown()


def test_a_redirect_from_a_public_server_to_a_private_one_is_refused(tmp_path, guard_on, monkeypatch):
    private = Counting("127.0.0.1", serve_sample)

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{private.server_address[1]}/latest/meta-data/")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    public = Counting("127.0.0.2", redirect)
    real = rp_ssrf.is_safe_address
    monkeypatch.setattr(rp_ssrf, "is_safe_address", lambda ip: ip == "127.0.0.2" or real(ip))  # 127.0.0.2 plays "public"
    with pytest.raises(JobError, match="non-public address 127.0.0.1"):
        download_dataset(f"http://127.0.0.2:{public.server_address[1]}/d.jsonl", tmp_path / "d", max_bytes=10**7, retries=0)
    assert (public.hits, private.hits) == (1, 0)
    assert not (tmp_path / "d").exists()
    public.shutdown()
    private.shutdown()


def test_a_huge_single_line_is_reported_not_loaded(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
        f.write(json.dumps({"prompt": "x" * 3_000_000, "completion": "y"}) + "\n")
    conversations, report = load_dataset(path, check=False, max_line_bytes=1_000_000)
    assert len(conversations) == 1 and report.invalid == 1
    assert report.problems[0]["message"].startswith("line 2: the line is longer than 1000000 bytes")


def test_planted_secrets_never_reach_a_log_an_output_or_a_file(tmp_path, storage, tiny_qwen2, s3):
    secrets = {"HF_TOKEN": "hf_plantedSecret0123456789", "S3_SECRET_ACCESS_KEY": S3_KEYS["S3_SECRET_ACCESS_KEY"]}
    callback_secret = "planted-callback-secret"
    env = {**secrets, "S3_ACCESS_KEY_ID": S3_KEYS["S3_ACCESS_KEY_ID"], "S3_ENDPOINT_URL": s3[0], "S3_BUCKET": "lora-models"}
    with running_worker(tmp_path, **env) as worker:
        result = runsync(worker, {
            "job_id": "secrets", "dataset_url": storage.url(SAMPLE.name, storage.good),
            "callback_url": f"http://127.0.0.1:9/cb?sig={callback_secret}",
            "hyperparameters": {"base_model": str(tiny_qwen2), "max_steps": 1, "max_seq_length": 256}})
    assert result["status"] == "COMPLETED", result
    # The presigned URLs in the output carry the access key id (an identifier, not a secret) by design.
    planted = [*secrets.values(), storage.good, callback_secret]
    texts = {"output": json.dumps(result), "worker log": worker.log.read_text()}
    for path in (tmp_path / "jobs").rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 10
    for where, text in texts.items():
        for secret in planted:
            assert secret not in text, f"{secret} leaked into {where}"
