"""compat.py's workarounds against the real libraries: each test fails when the private name is gone or what it does
has changed, and when an installed version is not the one compat.py says it was written against."""

import datetime
import json
import re
import ssl
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from runpod.serverless.modules import rp_http
from transformers.core_model_loading import Concatenate, WeightConverter

import compat
from conftest import ROOT


@contextmanager
def serving(handler_class, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
    """An HTTP(S) server on a real loopback socket, answering with `handler_class`; yields its port."""
    handler_class.log_message = lambda self, *args: None
    server = ThreadingHTTPServer((host, 0), handler_class)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------- versions

@pytest.mark.parametrize("library", sorted(compat.WRITTEN_AGAINST))
def test_the_installed_library_is_the_version_its_workarounds_were_written_against(library):
    assert version(library) == compat.WRITTEN_AGAINST[library], (
        f"{library} {version(library)} is installed; compat.py's {library} workarounds were written against "
        f"{compat.WRITTEN_AGAINST[library]}: read them again, then update WRITTEN_AGAINST")
    pins = dict(re.findall(r"^([\w-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    assert pins[library] == compat.WRITTEN_AGAINST[library]


# ---------------------------------------------------------------------------- runpod: post_progress

# Runs in a process of its own: the SDK reads RUNPOD_WEBHOOK_POST_OUTPUT when it is imported. The endpoint holds its
# answer to the first update until the other three have arrived, or 3 s; each update is sent from inside a running
# event loop, as the SDK runs the handler.
SENDER = r"""
import asyncio, json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

received, others = [], threading.Semaphore(0)

class Endpoint(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["output"]["step"] == 0:
            deadline = time.monotonic() + 3
            for _ in range(3):
                others.acquire(timeout=max(0.0, deadline - time.monotonic()))
        else:
            others.release()
        received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
threading.Thread(target=server.serve_forever, daemon=True).start()
endpoint = f"http://127.0.0.1:{server.server_address[1]}"
os.environ["RUNPOD_WEBHOOK_POST_OUTPUT"] = endpoint + "/job-done/$RUNPOD_POD_ID/$ID?gpu=1"
os.environ["RUNPOD_POD_ID"], os.environ["RUNPOD_AI_API_KEY"] = "pod-7", "key-123"
sys.path.insert(0, sys.argv[2])
import runpod
import compat

job, arrived = {"id": "job-42"}, []

async def in_the_sdks_loop():
    for step in range(4):
        if sys.argv[1] == "compat":
            compat.post_progress(job, {"step": step})
        else:
            runpod.serverless.progress_update(job, {"step": step})
        arrived.append(len(received))

asyncio.run(in_the_sdks_loop())
deadline = time.monotonic() + 30
while len(received) < 4 and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"arrived": arrived, "received": received}))
"""


def send_four_updates(how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SENDER, how, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_post_progress_has_delivered_each_update_in_order_when_it_returns():
    sent = send_four_updates("compat")
    assert sent["arrived"] == [1, 2, 3, 4]
    assert [r["body"] for r in sent["received"]] == [{"status": "IN_PROGRESS", "output": {"step": s}} for s in range(4)]
    assert {r["path"] for r in sent["received"]} == {"/job-done/pod-7/job-42?gpu=1&isStream=false"}
    assert {r["auth"] for r in sent["received"]} == {"key-123"}


def test_the_sdks_own_progress_update_returns_before_sending_and_can_reorder_updates():
    """Why post_progress exists: should this fail, the SDK's progress_update may already do what it does."""
    sent = send_four_updates("sdk")
    assert sent["arrived"][0] == 0
    assert [r["body"]["output"]["step"] for r in sent["received"]] != [0, 1, 2, 3]


def test_post_progress_returns_false_when_the_send_outlasts_its_timeout(monkeypatch):
    answer = threading.Event()

    class Silent(BaseHTTPRequestHandler):
        def do_POST(self):
            answer.wait(10)

    with serving(Silent) as port:
        monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"http://127.0.0.1:{port}/done/$ID?x=1")
        try:
            assert compat.post_progress({"id": "j"}, {"step": 1}, timeout_s=0.5) is False
        finally:
            answer.set()


# ---------------------------------------------------------------------------- runpod: pinned_session

def recording_handler(seen: list):
    class Recording(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append({"host": self.headers["Host"], "path": self.path,
                         "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(204)
            self.end_headers()
    return Recording


def test_pinned_session_dials_the_pinned_address_and_keeps_the_urls_host():
    seen = []
    with serving(recording_handler(seen)) as port, compat.pinned_session("127.0.0.1") as session:
        # callback.invalid has no address (RFC 6761): the request can only arrive through the pin
        response = session.post(f"http://callback.invalid:{port}/done", json={"status": "completed"}, timeout=10)
    assert response.status_code == 204
    assert seen == [{"host": f"callback.invalid:{port}", "path": "/done", "body": {"status": "completed"}}]


def test_pinned_session_never_dials_the_urls_own_address():
    seen = []
    with serving(recording_handler(seen)) as port, compat.pinned_session("127.0.0.2") as session:
        with pytest.raises(requests.ConnectionError):  # nothing listens on 127.0.0.2, the pinned address
            session.post(f"http://127.0.0.1:{port}/done", json={}, timeout=10)
    assert seen == []


def self_signed(tmp_path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_pinned_session_checks_the_certificate_against_the_urls_host_not_the_address(tmp_path):
    cert_file, key_file = self_signed(tmp_path, "callback.example")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    names = []
    tls.sni_callback = lambda sock, name, context: names.append(name)
    seen = []
    with serving(recording_handler(seen), tls=tls) as port, compat.pinned_session("127.0.0.1") as session:
        ok = session.post(f"https://callback.example:{port}/done", json={"n": 1}, timeout=10, verify=str(cert_file))
        with pytest.raises(requests.exceptions.SSLError):  # a certificate for another name is refused
            session.post(f"https://other.example:{port}/done", json={"n": 2}, timeout=10, verify=str(cert_file))
    assert ok.status_code == 204 and [s["body"] for s in seen] == [{"n": 1}]
    assert names[0] == "callback.example"  # the TLS SNI names the URL's host


# ---------------------------------------------------------------------------- transformers: conversion_patterns

FUSED_EXPERTS = [(["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"], ["mlp.experts.gate_up_proj"]),
                 (["mlp.experts.*.down_proj.weight"], ["mlp.experts.down_proj"])]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "qwen3_next"])
def test_conversion_patterns_are_the_expert_fusion_as_the_mapping_writes_it(model_type):
    assert compat.conversion_patterns(model_type) == FUSED_EXPERTS


def test_conversion_patterns_are_none_without_a_mapping_or_with_renames():
    assert compat.conversion_patterns("qwen2") is None  # dense: no mapping
    assert compat.conversion_patterns("mixtral") is None  # block_sparse_moe renamed on load


def test_conversion_patterns_are_the_ones_written_not_the_rewritten_public_ones():
    converter = WeightConverter(["mlp.experts.*.w1.weight", "mlp.experts.*.w3.weight"], "^model.(experts).fused",
                                operations=[Concatenate(dim=0)])
    assert converter.target_patterns != ["^model.(experts).fused"]  # rewritten for the reverse mapping
    assert converter._original_target_patterns == ["^model.(experts).fused"]
    assert converter._original_source_patterns == ["mlp.experts.*.w1.weight", "mlp.experts.*.w3.weight"]


def test_supports_flex_attention_reads_transformers_own_flag():
    from transformers import PreTrainedModel
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextForCausalLM

    assert hasattr(PreTrainedModel, "_supports_flex_attn")  # the flag every model class inherits
    assert compat.supports_flex_attention(Qwen2ForCausalLM)
    assert not compat.supports_flex_attention(Qwen3NextForCausalLM)  # no flex attention for it in transformers 5.23


# ---------------------------------------------------------------------------- peft

SHARED_EXPERT = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]


def _lora_targets(model_dir, named: bool) -> tuple[list[str], list[str]]:
    """The targets PEFT attaches LoRA to on the stock Qwen3-Next model, with or without `lora_targets_as_named`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    config = LoraConfig(r=2, target_modules=[*SHARED_EXPERT, "q_proj"], lora_dropout=0.0)
    if named:
        with compat.lora_targets_as_named():
            config = get_peft_model(model, config).peft_config["default"]
    else:
        config = get_peft_model(model, config).peft_config["default"]
    return sorted(config.target_modules), sorted(config.target_parameters or [])


def test_peft_rewrites_expert_named_targets_and_lora_targets_as_named_keeps_them(tmp_path):
    """The reason for both PEFT workarounds (huggingface/peft#3711): PEFT turns the shared expert's projections into
    the fused experts' parameters; inside `lora_targets_as_named` they are used as named, and the patch is undone."""
    from peft.utils import transformers_weight_conversion as conversion

    from tiny_model import build_tiny_model

    model_dir = build_tiny_model("qwen3_next", tmp_path / "qwen3-next")
    original = conversion.convert_peft_config_for_transformers
    assert _lora_targets(model_dir, named=False) == (["q_proj"], ["down_proj", "gate_up_proj"])
    assert _lora_targets(model_dir, named=True) == (sorted([*SHARED_EXPERT, "q_proj"]), [])
    assert conversion.convert_peft_config_for_transformers is original


def test_stock_loadable_config_names_the_rewritten_targets_as_parameters():
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING

    assert {"gate_proj", "up_proj", "down_proj"} <= set(
        _MOE_TARGET_MODULE_MAPPING[_MODEL_TO_CONVERSION_PATTERN["qwen3_next"]])
    config = {"target_modules": ["shared_expert.gate_proj", "q_proj"], "lora_dropout": 0.1, "exclude_modules": "x"}
    assert compat.stock_loadable_config(config, "qwen3_next") == {
        "target_modules": ["q_proj"], "target_parameters": ["shared_expert.gate_proj.weight"], "lora_dropout": 0.0,
        "exclude_modules": None}
    dense = {"target_modules": ["gate_proj", "q_proj"], "lora_dropout": 0.1}
    assert compat.stock_loadable_config(dense, "qwen2") == dense  # no conversion for the model type: unchanged
