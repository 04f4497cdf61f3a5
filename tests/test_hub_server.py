"""The real huggingface_hub client (2.4) against tests/hub_server.py: what works, and what a fault does to it.

In one process the client's endpoint is fixed at import (`constants.ENDPOINT` reads HF_ENDPOINT once), so every
call here passes `endpoint=hub.endpoint`; see test_hf_endpoint_is_read_at_import for the alternatives."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils._http import default_client_factory

from hub_server import HubServer, loopback_only_client

REPO = "acme/tiny"
MiB = 1024 * 1024


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub with `acme/tiny` (2 text files, 3 LFS files) and `acme/big` (one 12 MiB safetensors file)."""
    tiny = tmp_path / "hub" / REPO
    (tiny / "sub").mkdir(parents=True)
    (tiny / "config.json").write_text('{"model_type": "qwen2"}')
    (tiny / "sub" / "notes.txt").write_text("hello")
    (tiny / "model.safetensors").write_bytes(os.urandom(300_000))
    (tiny / "pytorch_model.bin").write_bytes(os.urandom(2_000))
    (tiny / "tokenizer.model").write_bytes(os.urandom(500))
    big = tmp_path / "hub" / "acme" / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(os.urandom(12 * MiB))
    with HubServer(tmp_path / "hub") as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)  # read by processes started from here, not by this one
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        huggingface_hub.set_client_factory(loopback_only_client)
        server.dir = tmp_path
        try:
            yield server
        finally:
            huggingface_hub.set_client_factory(default_client_factory)


def dirs(hub, name):
    """`local_dir=` and `cache_dir=` for one download, both under the test's tmp_path."""
    return {"local_dir": hub.dir / name, "cache_dir": hub.dir / "cache" / name}


def original(hub, repo_id, filename) -> bytes:
    return (hub.root / repo_id / filename).read_bytes()


def test_model_info_lists_files_with_sizes_and_lfs_hashes(hub):
    info = HfApi(endpoint=hub.endpoint, token=False).model_info(REPO, revision=None, files_metadata=True)
    assert len(info.sha) == 40 and info.sha == hub.commit(REPO) and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {"config.json", "sub/notes.txt", "model.safetensors", "pytorch_model.bin",
                             "tokenizer.model"}
    for name, s in siblings.items():
        data = original(hub, REPO, name)
        assert s.size == len(data)
        if name.endswith((".safetensors", ".bin", ".model")):
            assert (s.lfs.sha256, s.lfs.size) == (hashlib.sha256(data).hexdigest(), len(data))
        else:
            assert s.lfs is None
    assert HfApi(endpoint=hub.endpoint).model_info(REPO, revision=info.sha).siblings[0].size is None  # no blobs

    tree = HfApi(endpoint=hub.endpoint, token=False).list_repo_tree(REPO, recursive=True, revision=info.sha)
    assert sorted(f.path for f in tree) == sorted([*siblings, "sub"])


def test_commit_changes_with_a_file(hub):
    before = hub.commit(REPO)
    (hub.root / REPO / "config.json").write_text('{"model_type": "llama"}')
    assert hub.commit(REPO) != before
    assert HfApi(endpoint=hub.endpoint).model_info(REPO).sha == hub.commit(REPO)


def test_snapshot_download_fetches_only_the_allowed_files(hub):
    path = snapshot_download(REPO, revision="main", allow_patterns=["*.json", "*.safetensors"], token=False,
                             endpoint=hub.endpoint, **dirs(hub, "snap"))
    got = {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert got == {"config.json", "model.safetensors"}
    for name in got:
        assert (Path(path) / name).read_bytes() == original(hub, REPO, name)
    assert hub.bytes_served[(REPO, "pytorch_model.bin")] == 0
    assert hub.bytes_served[(REPO, "model.safetensors")] == 300_000
    sha = hub.commit(REPO)
    # The client resolves "main", lists the tree at the commit, then HEADs each file; an LFS file is fetched from the
    # CDN the HEAD redirected it to.
    assert hub.requests[:2] == [("GET", f"/api/models/{REPO}/revision/main"), ("GET", f"/api/models/{REPO}/tree/{sha}")]
    assert ("HEAD", f"/{REPO}/resolve/{sha}/model.safetensors") in hub.requests
    assert [r for r in hub.requests if r[0] == "GET" and "model.safetensors" in r[1]] == [
        ("GET", f"/cdn-lfs/{REPO}/{hashlib.sha256(original(hub, REPO, 'model.safetensors')).hexdigest()}"
                "/model.safetensors")]


def test_a_body_cut_short_is_retried_and_resumed_from_what_was_written(hub):
    """The client retries a body that ends early (RemoteProtocolError) after 1 s, up to 5 times, asking with a
    Range for what it has not written yet (how much it wrote before the cut depends on how the bytes arrived:
    it writes what it reads, up to 10 MiB at a time), and the file ends up whole."""
    for repo, size, cut in ((REPO, 300_000, 100_000), ("acme/big", 12 * MiB, 11 * MiB)):
        hub.cut_after[(repo, "model.safetensors")] = cut
        path = hf_hub_download(repo, "model.safetensors", revision=hub.commit(repo), token=False, endpoint=hub.endpoint,
                               **dirs(hub, f"cut-{size}"))
        assert Path(path).read_bytes() == original(hub, repo, "model.safetensors")
        # the cut part, then at most all again
        assert size < hub.bytes_served[(repo, "model.safetensors")] <= cut + size
        assert not hub.cut_after


def test_a_reset_connection_raises_read_error_and_a_new_call_starts_over(hub):
    """A reset (ECONNRESET) is httpx2.ReadError, which http_get does not retry: hf_hub_download raises it. It is not
    an OSError nor an HfHubHTTPError. The partial file is deleted, so the next call downloads the whole file."""
    kwargs = {"revision": hub.commit(REPO), "token": False, "endpoint": hub.endpoint, **dirs(hub, "reset")}
    hub.reset_after[(REPO, "model.safetensors")] = 100_000
    with pytest.raises(httpx2.ReadError) as raised:
        hf_hub_download(REPO, "model.safetensors", **kwargs)
    assert not isinstance(raised.value, OSError)
    assert not list((hub.dir / "reset").rglob("*.incomplete"))
    assert not (hub.dir / "reset" / "model.safetensors").exists()
    path = hf_hub_download(REPO, "model.safetensors", **kwargs)
    assert Path(path).read_bytes() == original(hub, REPO, "model.safetensors")
    assert hub.bytes_served[(REPO, "model.safetensors")] == 100_000 + 300_000


def test_a_slow_download_can_be_watched(hub):
    hub.slow_s = 0.05  # per 64 KiB: ~0.25 s for 300,000 bytes
    done = threading.Thread(target=hf_hub_download, args=(REPO, "model.safetensors"),
                            kwargs={"token": False, "endpoint": hub.endpoint, **dirs(hub, "slow")})
    done.start()
    seen = set()
    while done.is_alive():
        seen.add(hub.bytes_served[(REPO, "model.safetensors")])
        time.sleep(0.01)
    assert any(0 < n < 300_000 for n in seen)
    assert (hub.dir / "slow" / "model.safetensors").read_bytes() == original(hub, REPO, "model.safetensors")


def test_gated_repo(hub):
    hub.gated[REPO] = {"hf_good_token"}
    # As on the Hub, a gated repo's info and file list are public: only its files are gated.
    assert HfApi(endpoint=hub.endpoint, token=False).model_info(REPO, files_metadata=True).gated == "manual"
    for token, status in ((False, 401), ("hf_wrong_token", 403)):
        with pytest.raises(GatedRepoError) as raised:
            hf_hub_download(REPO, "config.json", token=token, endpoint=hub.endpoint, **dirs(hub, f"g{status}"))
        assert raised.value.response.status_code == status
        with pytest.raises(GatedRepoError):
            snapshot_download(REPO, token=token, endpoint=hub.endpoint, **dirs(hub, f"gs{status}"))
    assert hub.bytes_served == {}
    before = len(hub.requests)
    path = snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"], token="hf_good_token",
                             endpoint=hub.endpoint, **dirs(hub, "good"))
    assert (Path(path) / "config.json").read_bytes() == original(hub, REPO, "config.json")
    assert (Path(path) / "model.safetensors").read_bytes() == original(hub, REPO, "model.safetensors")
    # The token goes to the Hub (API, resolve), never to the CDN a HEAD redirected to.
    sent = dict(zip(hub.requests[before:], hub.tokens[before:]))
    assert sent[("HEAD", f"/{REPO}/resolve/{hub.commit(REPO)}/model.safetensors")] == "hf_good_token"
    assert [token for (method, path), token in sent.items() if path.startswith("/cdn-lfs/")] == [None]

    hub.gate_api = True  # stricter than the Hub: info and listings are gated too
    with pytest.raises(GatedRepoError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)
    assert HfApi(endpoint=hub.endpoint, token="hf_good_token").model_info(REPO).gated == "manual"


def test_missing_repo_file_and_revision(hub):
    api = HfApi(endpoint=hub.endpoint)
    for token, status in ((False, 401), ("hf_any_token", 404)):
        for call in (lambda: api.model_info("acme/nope", token=token),
                     lambda: hf_hub_download("acme/nope", "config.json", token=token, endpoint=hub.endpoint,
                                             **dirs(hub, f"nope-file-{status}")),
                     lambda: snapshot_download("acme/nope", token=token, endpoint=hub.endpoint,
                                               **dirs(hub, f"nope-snap-{status}"))):
            with pytest.raises(RepositoryNotFoundError) as raised:
                call()
            assert not isinstance(raised.value, GatedRepoError)
            assert raised.value.response.status_code == status
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json", token=False, endpoint=hub.endpoint, **dirs(hub, "entry"))
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9", token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40, token=False, endpoint=hub.endpoint, **dirs(hub, "rev"))


def test_snapshot_download_into_a_used_local_dir_does_not_raise_the_access_error(hub, caplog):
    """When the repo cannot be listed (missing, gated, 401), snapshot_download looks at `local_dir` first: holding
    anything at all (here only the `.cache/` a failed call left) it is returned, with a warning; holding an earlier
    partial snapshot, IncompleteSnapshotError (a LocalEntryNotFoundError) is raised, not the GatedRepoError."""
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/nope", "config.json", token=False, endpoint=hub.endpoint, **dirs(hub, "used"))
    assert snapshot_download("acme/nope", token=False, endpoint=hub.endpoint, **dirs(hub, "used")) == str(
        hub.dir / "used")
    assert "Returning existing local_dir" in caplog.text

    snapshot_download(REPO, allow_patterns=["config.json"], token=False, endpoint=hub.endpoint, **dirs(hub, "part"))
    hub.gated[REPO], hub.gate_api = {"hf_good_token"}, True
    with pytest.raises(IncompleteSnapshotError) as raised:
        snapshot_download(REPO, token=False, endpoint=hub.endpoint, **dirs(hub, "part"))
    assert not isinstance(raised.value, HfHubHTTPError) and "GatedRepoError" in str(raised.value)
    with pytest.raises(GatedRepoError):  # a fresh directory raises the access error itself
        snapshot_download(REPO, token=False, endpoint=hub.endpoint, **dirs(hub, "fresh"))


def test_hf_endpoint_is_read_at_import(hub, monkeypatch):
    # In this process the env var set by the fixture came too late: the client still points at huggingface.co.
    assert os.environ["HF_ENDPOINT"] == hub.endpoint != constants.ENDPOINT  # "https://huggingface.co"
    assert hf_hub_url(REPO, "config.json").startswith(constants.ENDPOINT + "/")
    assert hf_hub_url(REPO, "config.json", endpoint=hub.endpoint).startswith(hub.endpoint + "/")

    # Code that takes no endpoint= (as model_hub.py) can be redirected by patching both import-time constants;
    # HfApi() objects made afterwards follow, the module-level functions (huggingface_hub.model_info...) do not.
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    path = snapshot_download(REPO, allow_patterns=["config.json"], token=False, **dirs(hub, "patched"))
    assert (Path(path) / "config.json").read_bytes() == original(hub, REPO, "config.json")
    assert HfApi().endpoint == hub.endpoint != huggingface_hub.hf_api.api.endpoint  # the one behind model_info & co.

    # A process that imports huggingface_hub after HF_ENDPOINT is set uses it, with no endpoint= anywhere.
    code = ("import sys, huggingface_hub as h; from hub_server import loopback_only_client;"
            "h.set_client_factory(loopback_only_client);"
            "print(h.snapshot_download(sys.argv[1], allow_patterns=['*.json'], local_dir=sys.argv[2], token=False))")
    out = subprocess.run([sys.executable, "-c", code, REPO, str(hub.dir / "child")], capture_output=True, text=True,
                         cwd=Path(__file__).parent, env=os.environ | {"HF_HUB_CACHE": str(hub.dir / "child-cache")},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert (hub.dir / "child" / "config.json").read_bytes() == original(hub, REPO, "config.json")
