"""Shared fixtures: tiny local models with real tokenizers, the bundled sample, a signed-URL server."""

import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

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
