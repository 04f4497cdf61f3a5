"""Shared fixtures: tiny local models with real tokenizers, the bundled sample, a signed-URL server, a worker
process, an S3 server, the app's Supabase; helpers for resumed runs (a crash at a step, checkpoints where asked)
and for costs measured as ratios."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

# The tests are CPU tests (fp32, exact comparisons), also on a machine with a GPU: hide it from
# torch here and in every process the tests start. GPU figures are the benchmark's (`make bench`).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# No test reaches the Hugging Face Hub: a download goes to a closed loopback port and fails at once, unless
# the test starts tests/hub_server.py and points HF_ENDPOINT (or endpoint=) at it.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import checkpoints  # noqa: E402
from dataset_loader import load_dataset  # noqa: E402
from signed_url_server import SignedUrlServer  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

SAMPLE = ROOT / "data" / "brightrun-eq12-demo.jsonl"


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Qwen2 architecture, byte-level BPE, ChatML template; EOS <|endoftext|>, turns end with <|im_end|>."""
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """Mistral architecture, SentencePiece-style BPE, no chat template (like Mistral-7B-v0.1)."""
    return build_tiny_model("mistral", tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture
def storage(tmp_path):
    """A Supabase-like signed-URL server on loopback serving a copy of the sample.

    `storage.good` is a valid token, `storage.old` an expired one."""
    root = tmp_path / "bucket"
    root.mkdir()
    shutil.copy(SAMPLE, root / SAMPLE.name)
    with SignedUrlServer(root) as server:
        server.good, server.old = "sig-4f9a0c1e", "sig-expired-77b1"
        server.tokens.add(server.good)
        server.expired.add(server.old)
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_worker(tmp: Path, **env):
    """`python handler.py --rp_serve_api` (the SDK's local API server) on a free loopback port."""
    port = free_port()
    env = os.environ | {"JOBS_DIR": str(tmp / "jobs"), "MODEL_CACHE_DIR": str(tmp / "models"),  # 4-bit copies go here
                        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true",
                        "DOWNLOAD_RETRIES": "1", "TOKENIZERS_PARALLELISM": "false"} | env
    log_path = tmp / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, f"worker exited early:\n{log_path.read_text()}"
            try:
                requests.get(f"{url}/docs", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, f"worker did not start:\n{log_path.read_text()}"
                time.sleep(0.3)
        yield SimpleNamespace(url=url, jobs=tmp / "jobs", log=log_path, proc=proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def runsync(worker, job_input: dict) -> dict:
    response = requests.post(f"{worker.url}/runsync", json={"input": job_input}, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


class Recorder:
    """An HTTP server on loopback that keeps every POST it receives (path and JSON body)."""

    def __init__(self):
        self.posts: list[tuple[str, dict]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    recorder.posts.append((self.path, json.loads(body)))
                except ValueError:
                    recorder.posts.append((self.path, {"unparsed": body.decode("utf-8", "replace")}))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def recorder():
    """A Recorder for the module's tests (e.g. as RUNPOD_WEBHOOK_POST_OUTPUT, the SDK's progress endpoint)."""
    r = Recorder()
    yield r
    r.close()


S3_KEYS = {"S3_ACCESS_KEY_ID": "AKIAEXAMPLEKEY123", "S3_SECRET_ACCESS_KEY": "s3-secret-value-9b8a7"}


@pytest.fixture(scope="session")
def s3():
    """An S3 API server (moto in server mode) on loopback with a bucket `lora-models`: (endpoint, client)."""
    # imported here, not at the top: moto adds its stub to botocore's built-in handlers as it loads, which only the
    # sessions that start this server should have
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=S3_KEYS["S3_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["S3_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket="lora-models")
    yield endpoint, client
    server.stop()


# ---------------------------------------------------------------------------- resume: crashes and checkpoints

HP = dict(max_steps=6, batch_size=2, max_seq_length=384, lora_rank=4, checkpoint_steps=2, warmup_steps=1)


class Crash(Exception):
    pass


def crash_at(step):
    """An on_progress that crashes the run once `step` has trained."""
    def on_progress(event):
        if event.get("step") == step and "loss" in event:
            raise Crash(f"simulated crash after step {step}")
    return on_progress


def losses(adapter_dir):
    return [json.loads(line)["loss"] for line in (adapter_dir / "training_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def conversations():
    """The sample's first 16 conversations."""
    return load_dataset(SAMPLE)[0][:16]


@pytest.fixture
def checkpoints_where_asked(monkeypatch):
    """For tests that pin which steps have a checkpoint: every `checkpoint_steps`, not spaced by their write time
    (checkpoints.CHECKPOINT_TIME_SHARE; tested in tests/test_checkpoints.py)."""
    monkeypatch.setattr(checkpoints, "CHECKPOINT_TIME_SHARE", 1.0)


# ---------------------------------------------------------------------------- costs out of proportion

def write(tmp_path, lines, name="d.jsonl"):
    """A dataset file of `lines` (dicts as JSON, strings as they are), one a line."""
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def chat(*pairs):
    """An OpenAI-format record of (role, content) pairs."""
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def seconds(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def growth(call, small, large, runs: int = 5) -> float:
    """How many times longer `call(large)` takes than `call(small)`, each the best of `runs` (a busy machine's slow
    spells inflate single runs, never the best one)."""
    call(small)  # warm-up
    return min(seconds(call, large) for _ in range(runs)) / min(seconds(call, small) for _ in range(runs))


from supabase_fixtures import postgres_dsn, supabase  # noqa: E402,F401  (the app's Supabase, on a real PostgreSQL)
