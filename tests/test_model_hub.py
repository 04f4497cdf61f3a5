"""Where a base model is found (the allow-list, the download switch and remote code, the cached models offered,
the app team's HF_HOME and MODEL_PATH, a machine without the runpod SDK), and one that is not cached, downloaded on
first use from a local server that speaks the Hub's file API (tests/hub_server.py, with the real huggingface_hub
client): what is fetched, in which order, what is checked before any weight arrives (the GPU, the volume's room, the
listed sizes), that no link planted on the volume is written through, and that a download cut short is never used
nor left behind."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import handler
from architecture import load_config, meta_model
from conftest import ROOT, SAMPLE, running_worker, runsync
from hub_server import HubServer
from job import JobError
from model_hub import HubDownload, files_to_load, find_base_model, resolve_base_model, trust_remote_code_for
from settings import WorkerSettings


def test_models_are_found_without_the_runpod_sdk(tiny_qwen2, monkeypatch):
    monkeypatch.setitem(sys.modules, "runpod", None)  # a benchmark machine with only the training libraries
    assert resolve_base_model(str(tiny_qwen2), []) == tiny_qwen2


def test_allow_list_download_switch_and_remote_code(tmp_path):
    with pytest.raises(JobError, match="not on this worker's allow-list"):
        resolve_base_model("evil/model", [tmp_path], allowed=["Qwen/Qwen2.5-7B-Instruct"])
    with pytest.raises(JobError, match="set ALLOW_MODEL_DOWNLOAD=true"):
        resolve_base_model("Qwen/Qwen2.5-7B-Instruct", [tmp_path])
    assert not trust_remote_code_for("some/model", []) and trust_remote_code_for("some/model", ["some/model"])


def test_the_kept_4bit_copies_are_not_offered_as_cached_models(tmp_path):
    for model in ("Qwen/Qwen2.5-7B-Instruct", ".quantized/Qwen2.5-7B-Instruct-0123456789abcdef"):
        (tmp_path / model).mkdir(parents=True)
        (tmp_path / model / "config.json").write_text("{}")
    with pytest.raises(JobError, match=r"Cached models: Qwen/Qwen2.5-7B-Instruct\. Pick"):
        resolve_base_model("mistralai/Mistral-7B-v0.1", [tmp_path])


def test_models_in_the_app_teams_hf_home_and_model_path_are_found(tmp_path, monkeypatch):
    """The app's team keeps Qwen3-Next in the Hugging Face cache layout under HF_HOME on the volume (a lower-cased copy
    beside it) and points MODEL_PATH at a link to its snapshot."""
    hf_home = tmp_path / "huggingface-cache"
    snapshot = hf_home / "hub" / "models--Qwen--Qwen3-Next-80B-A3B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    assert find_base_model("Qwen/Qwen3-Next-80B-A3B-Instruct", [], runpod_cache=tmp_path / "none") == snapshot
    assert find_base_model("qwen/qwen3-next-80b-a3b-instruct", [], runpod_cache=tmp_path / "none") == snapshot
    monkeypatch.delenv("HF_HOME")
    link = tmp_path / "models" / "Qwen3-Next-80B-A3B-Instruct"
    link.parent.mkdir()
    link.symlink_to(snapshot)
    monkeypatch.setenv("MODEL_PATH", str(link))
    assert find_base_model("Qwen/Qwen3-Next-80B-A3B-Instruct", [], runpod_cache=tmp_path / "none") == link
    assert find_base_model("Qwen/Qwen2.5-7B-Instruct", [], runpod_cache=tmp_path / "none") is None


CONFIGS = Path(__file__).resolve().parent.parent / "data" / "model-configs"


def publish(tiny_qwen2: Path, repo: Path, extras: bool = True) -> Path:
    """A Hub repo holding the tiny model, and the duplicates real repos carry (a .bin beside the safetensors,
    an `original/` copy, a README), which a load does not need."""
    shutil.copytree(tiny_qwen2, repo)
    if extras:
        (repo / "pytorch_model.bin").write_bytes(os.urandom(50_000))
        (repo / "original").mkdir()
        (repo / "original" / "consolidated.safetensors").write_bytes(os.urandom(40_000))
        (repo / "README.md").write_text("# tiny chat model\n")
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_qwen2):
    root = tmp_path_factory.mktemp("hub")
    for name in ("tiny-chat", "tiny-cut", "gated"):
        publish(tiny_qwen2, root / "acme" / name)
    with HubServer(root) as server:
        server.gated["acme/gated"] = {"hf_good_token"}
        yield server


@pytest.fixture(scope="module")
def worker(tmp_path_factory, hub, recorder):
    env = {"HF_ENDPOINT": hub.endpoint, "PROGRESS_INTERVAL_S": "0",
           "RUNPOD_WEBHOOK_POST_OUTPUT": recorder.url("/progress?id=$ID")}
    with running_worker(tmp_path_factory.mktemp("worker"), **env) as w:
        w.models = w.jobs.parent / "models"
        yield w


def job(storage, job_id, base_model):
    return {"job_id": job_id, "dataset_url": storage.url(SAMPLE.name, storage.good),
            "hyperparameters": {"base_model": base_model, "max_steps": 2, "batch_size": 2, "max_seq_length": 512,
                                "rank": 4}}


def fetched(hub, repo_id):
    """The files of `repo_id` the client asked for, in order (each download starts with a HEAD of the file;
    the contents of LFS files then come from the hub's CDN, counted in `hub.bytes_served`)."""
    order = [path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests
             if method == "HEAD" and path.startswith(f"/{repo_id}/resolve/")]
    return list(dict.fromkeys(order))


@pytest.mark.slow  # starts a worker process
def test_a_model_not_cached_is_downloaded_once_with_only_what_a_load_needs_and_reused(worker, hub, storage, recorder):
    result = runsync(worker, job(storage, "download-1", "acme/tiny-chat"))
    assert result["status"] == "COMPLETED", result
    target = worker.models / "acme" / "tiny-chat"
    assert result["output"]["model_metadata"]["base_model_path"] == str(target)
    assert any("was downloaded into" in w for w in result["output"]["warnings"])
    # config.json first; the weights once, as safetensors; no duplicate .bin, no original/, no README
    order = fetched(hub, "acme/tiny-chat")
    assert order[0] == "config.json" and order[-1] == "model.safetensors"
    assert hub.bytes_served[("acme/tiny-chat", "model.safetensors")] == (target / "model.safetensors").stat().st_size
    for unused in ("pytorch_model.bin", "original/consolidated.safetensors", "README.md"):
        assert hub.bytes_served[("acme/tiny-chat", unused)] == 0, unused
    assert sorted(p.name for p in target.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert not (worker.models / ".downloads" / "acme--tiny-chat").exists()
    # the download is a stage of its own, between the dataset and the training
    stages = [body["output"]["stage"] for path, body in recorder.posts if f"id={result['id']}&" in path]
    assert ("downloading_model" in stages
            and stages.index("loading_data") < stages.index("downloading_model") < stages.index("training"))

    requests_before = len(hub.requests)
    again = runsync(worker, job(storage, "download-2", "acme/tiny-chat"))
    assert again["status"] == "COMPLETED", again
    assert len(hub.requests) == requests_before  # the next job loads it from the volume: the hub hears nothing
    assert not any("was downloaded" in w for w in again["output"]["warnings"])


@pytest.mark.slow  # starts a worker process
def test_a_download_cut_short_is_never_used_and_the_next_attempt_completes_it(worker, hub, storage, tiny_qwen2):
    hub.reset_after[("acme/tiny-cut", "model.safetensors")] = 200_000
    failed = runsync(worker, job(storage, "cut-1", "acme/tiny-cut"))
    assert failed["status"] == "FAILED"
    assert failed["error"].startswith("downloading_model: downloading base model 'acme/tiny-cut' failed")
    assert "Retry the job" in failed["error"]
    target = worker.models / "acme" / "tiny-cut"
    assert not target.exists()  # nothing half-downloaded is where jobs look for models
    assert not (worker.models / ".downloads" / "acme--tiny-cut").exists()  # nor left on the volume

    again = runsync(worker, job(storage, "cut-1", "acme/tiny-cut"))
    assert again["status"] == "COMPLETED", again
    assert (target / "model.safetensors").read_bytes() == (tiny_qwen2 / "model.safetensors").read_bytes()


@pytest.mark.slow  # starts a worker process
def test_a_gated_model_without_a_working_token_fails_in_seconds_naming_it(worker, hub, storage):
    before = storage.hits[SAMPLE.name]
    result = runsync(worker, job(storage, "gated-1", "acme/gated"))
    assert result["status"] == "FAILED"
    assert result["error"] == ("loading_model: base model 'acme/gated' is gated on the Hugging Face Hub: set HF_TOKEN "
                               "on the endpoint to a token of an account that accepted its conditions on "
                               "https://huggingface.co/acme/gated")
    assert storage.hits[SAMPLE.name] == before  # failed before the dataset was downloaded
    assert hub.bytes_served[("acme/gated", "model.safetensors")] == 0
    assert not (worker.models / "acme" / "gated").exists()


def test_a_token_without_access_and_a_missing_model_say_what_to_do(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    with pytest.raises(JobError, match="the account of HF_TOKEN has not been granted access: accept its conditions on "
                                       "https://huggingface.co/acme/gated"):
        HubDownload("acme/gated", tmp_path, token="hf_other_token").prepare()
    with HubDownload("acme/gated", tmp_path, token="hf_good_token") as allowed:
        assert (allowed.prepare() / "config.json").is_file()
    with pytest.raises(JobError,
                       match="'acme/nope' is not on the Hugging Face Hub .* check hyperparameters.base_model"):
        HubDownload("acme/nope", tmp_path).prepare()


def test_the_volume_is_checked_for_room_before_any_weight_is_fetched(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    served = hub.bytes_served[("acme/tiny-chat", "model.safetensors")]
    with HubDownload("acme/tiny-chat", tmp_path / "models") as plan:
        config_dir = plan.prepare()
        assert json.loads((config_dir / "config.json").read_text())["model_type"] == "qwen2"
        assert plan.missing_bytes() == (hub.root / "acme" / "tiny-chat" / "model.safetensors").stat().st_size
        monkeypatch.setattr(shutil, "disk_usage",
                            lambda path: shutil._ntuple_diskusage(10 * 1024**3, 10 * 1024**3, 200 * 1024**2))
        with pytest.raises(JobError, match=r"has 0\.2 GB free; base model 'acme/tiny-chat' needs 1\.0 GB more .* "
                                           r"Enlarge the network volume"):
            plan.check_free_space()
    assert hub.bytes_served[("acme/tiny-chat", "model.safetensors")] == served  # no weight was fetched
    assert not (tmp_path / "models" / "acme" / "tiny-chat").exists()


def test_a_model_too_large_for_the_gpu_fails_on_its_config_before_the_dataset_or_a_weight(hub, storage, tiny_qwen2,
                                                                                          tmp_path, monkeypatch):
    """Qwen3-Next-80B's real config.json on a GPU with 24 GB free (the GPU's memory query is the only stand-in)."""
    repo = hub.root / "acme" / "next-80b"
    repo.mkdir(parents=True)
    shutil.copy(CONFIGS / "qwen3-next-80b-a3b.json", repo / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen2 / name, repo / name)
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (repo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for shard in shards:
        (repo / shard).write_bytes(os.urandom(10_000))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(handler, "select_precision", lambda setting: ("cuda", torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (24 * 1024**3, 80 * 1024**3))
    settings = WorkerSettings.from_env({"JOBS_DIR": str(tmp_path / "jobs"),
                                        "MODEL_CACHE_DIR": str(tmp_path / "models")})
    spec = {"job_id": "too-big", "dataset_url": storage.url(SAMPLE.name, storage.good),
            "hyperparameters": {"base_model": "acme/next-80b"}}
    before = storage.hits[SAMPLE.name]
    with pytest.raises(JobError) as refused:
        handler.run_job({"id": "x", "input": spec}, settings, handler.ProgressReporter({}, enabled=False))
    assert (str(refused.value).startswith("loading_model: acme/next-80b needs ~4")
            and "the GPU has 24 GB free" in str(refused.value))
    assert fetched(hub, "acme/next-80b")[0] == "config.json"
    assert all(hub.bytes_served[("acme/next-80b", s)] == 0 for s in shards) and storage.hits[SAMPLE.name] == before
    assert not (tmp_path / "models" / ".downloads" / "acme--next-80b.lock").exists()  # the download's lock was released


def test_the_download_switch_and_the_allow_list_lock_it_down(hub, storage, tmp_path, monkeypatch):
    for key, value in {"HF_ENDPOINT": hub.endpoint, "JOBS_DIR": str(tmp_path / "jobs"),
                       "MODEL_CACHE_DIR": str(tmp_path / "m"), "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(key, value)
    seen = len(hub.requests)
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOAD", "false")
    off = handler.handler({"id": "a", "input": job(storage, "switch-off", "acme/tiny-chat")})
    assert (off["error"].startswith("loading_model: base model 'acme/tiny-chat' was not found")
            and "ALLOW_MODEL_DOWNLOAD=true" in off["error"])
    monkeypatch.delenv("ALLOW_MODEL_DOWNLOAD")
    monkeypatch.setenv("BASE_MODEL_ALLOWLIST", "Qwen/Qwen2.5-7B-Instruct, mistralai/Mistral-7B-v0.1")
    listed = handler.handler({"id": "b", "input": job(storage, "not-listed", "acme/tiny-chat")})
    assert listed["error"] == ("loading_model: base model 'acme/tiny-chat' is not on this worker's allow-list "
                               "(Qwen/Qwen2.5-7B-Instruct, mistralai/Mistral-7B-v0.1); pick one of those")
    assert len(hub.requests) == seen  # neither asked the hub anything


def test_runpods_cached_models_are_found_before_the_volumes_and_the_hub(tiny_qwen2, tmp_path):
    cache = tmp_path / "huggingface-cache" / "hub"
    repo = cache / "models--acme--tiny-chat"
    shutil.copytree(tiny_qwen2, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    volume = tmp_path / "models"
    shutil.copytree(tiny_qwen2, volume / "acme" / "tiny-chat")
    assert find_base_model("acme/tiny-chat", [volume], runpod_cache=cache) == repo / "snapshots" / "abc123"
    assert find_base_model("acme/tiny-chat", [volume], runpod_cache=tmp_path / "none") == volume / "acme" / "tiny-chat"
    assert find_base_model("acme/elsewhere", [volume], runpod_cache=cache) is None


def test_only_one_copy_of_the_weights_is_chosen():
    mistral_v03 = {"config.json": 1, "params.json": 1, "tokenizer.json": 1, "tokenizer.model": 1,
                   "tokenizer.model.v3": 1, "consolidated.safetensors": 14, "model-00001-of-00003.safetensors": 5,
                   "model-00002-of-00003.safetensors": 5, "model-00003-of-00003.safetensors": 4,
                   "model.safetensors.index.json": 1, "README.md": 1}
    index = {"weight_map": {"a": "model-00001-of-00003.safetensors", "b": "model-00002-of-00003.safetensors",
                            "c": "model-00003-of-00003.safetensors"}}
    assert files_to_load(mistral_v03, index) == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json", "tokenizer.json",
        "tokenizer.model"]
    assert files_to_load({"config.json": 1, "pytorch_model.bin": 9, "model.safetensors": 9}, None) == [
        "config.json", "model.safetensors"]
    assert files_to_load({"config.json": 1, "pytorch_model.bin": 9, "original/model.pt": 9}, None) == [
        "config.json", "pytorch_model.bin"]


@pytest.mark.slow  # starts processes
def test_a_second_worker_waits_for_the_first_ones_download_and_uses_it(hub, tiny_qwen2, tmp_path, monkeypatch):
    publish(tiny_qwen2, hub.root / "acme" / "shared", extras=False)
    hub.slow_s = 0.05  # ~1 MB of weights in 64 KiB chunks: the first download takes about a second
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from model_hub import HubDownload\n"
        "with HubDownload('acme/shared', Path(sys.argv[1])) as d:\n    d.prepare(); d.complete()\n"), str(tmp_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lock = tmp_path / ".downloads" / "acme--shared.lock"
        deadline = time.monotonic() + 60
        while not lock.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first worker never took the lock"
            time.sleep(0.05)
        waits = []
        with HubDownload("acme/shared", tmp_path) as second:
            assert second.prepare(on_wait=lambda: waits.append(1)) is None  # completed by the other worker meanwhile
        assert first.wait(timeout=60) == 0 and waits
    finally:
        hub.slow_s = 0
        first.kill()
    assert (tmp_path / "acme" / "shared" / "config.json").is_file()
    assert hub.bytes_served[("acme/shared", "model.safetensors")] == (tiny_qwen2 / "model.safetensors").stat().st_size


def test_a_download_that_fails_midway_is_deleted_and_the_retry_starts_over(hub, tmp_path, monkeypatch):
    """The first shard arrives whole, the second is cut: nothing of it stays in `.downloads`; the repo then moves to a
    new commit (same names and sizes, other bytes) and the retry fetches that one."""
    repo = hub.root / "acme" / "moving"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "qwen2"}')
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (repo / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    for shard in shards:
        (repo / shard).write_bytes(b"A" * 300_000)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    hub.reset_after[("acme/moving", shards[1])] = 1000
    with pytest.raises(JobError, match="failed"), HubDownload("acme/moving", tmp_path) as plan:
        plan.prepare()
        plan.complete()
    assert hub.bytes_served[("acme/moving", shards[0])] == 300_000  # bytes were written before it failed
    assert not (tmp_path / ".downloads" / "acme--moving").exists() and not (tmp_path / "acme" / "moving").exists()
    for shard in shards:  # a new commit: same names, same sizes, other bytes
        (repo / shard).write_bytes(b"B" * 300_000)
    with HubDownload("acme/moving", tmp_path) as plan:
        plan.prepare()
        target = plan.complete()
    assert [(target / shard).read_bytes() == b"B" * 300_000 for shard in shards] == [True, True]


def test_a_model_that_runs_its_own_code_is_downloaded_with_it():
    listing = {"config.json": 1, "configuration_acme.py": 1, "modeling_acme.py": 1, "model.safetensors": 9}
    assert files_to_load(listing, None) == ["config.json", "model.safetensors"]
    assert files_to_load(listing, None, with_code=True) == ["config.json", "configuration_acme.py", "model.safetensors",
                                                             "modeling_acme.py"]


def test_a_model_not_on_the_hub_or_offline_names_the_cached_ones_instead_of_a_retry(hub, storage, tiny_qwen2, tmp_path,
                                                                                    monkeypatch):
    """A repository the Hub does not have, or any model while HF_HUB_OFFLINE is set: no retry would help, so the
    error names the model and lists what this worker has cached, before the dataset is downloaded."""
    models = tmp_path / "models"
    shutil.copytree(tiny_qwen2, models / "acme" / "cached-chat")
    for name, value in {"HF_ENDPOINT": hub.endpoint, "JOBS_DIR": str(tmp_path / "jobs"), "MODEL_CACHE_DIR": str(models),
                        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true"}.items():
        monkeypatch.setenv(name, value)
    missing = handler.handler({"id": "r-404", "input": job(storage, "hub-404", "acme/nope")})
    assert missing["error"].startswith("loading_model: base model 'acme/nope' is not on the Hugging Face Hub")
    assert (missing["error"].endswith("Cached models on this worker: acme/cached-chat")
            and "Retry" not in missing["error"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests_before = len(hub.requests)
    offline = handler.handler({"id": "r-off", "input": job(storage, "hub-offline", "acme/tiny-chat")})
    assert offline["error"].startswith("loading_model: base model 'acme/tiny-chat' was not found; searched ")
    assert "Cached models: acme/cached-chat" in offline["error"] and "unset HF_HUB_OFFLINE" in offline["error"]
    assert "Retry" not in offline["error"] and len(hub.requests) == requests_before
    assert storage.hits[SAMPLE.name] == 0


def test_a_link_planted_as_the_download_folder_is_replaced_by_a_directory_of_the_workers_own(hub, tmp_path,
                                                                                             monkeypatch):
    """`.downloads/<org>--<name>` pointing outside the volume, with the repo's commit in a `.commit` there (what a
    killed download would leave): the download is made in a fresh directory instead, and what the link pointed to is
    untouched. The model runs its own code (TRUST_REMOTE_CODE_MODELS), so its `.py` files are fetched too."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    repo = hub.root / "acme" / "coded"
    shutil.copytree(hub.root / "acme" / "tiny-chat", repo)
    (repo / "modeling_acme.py").write_text("# the repo's modelling code\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("precious")
    (outside / ".commit").write_text(hub.commit("acme/coded"))
    models = tmp_path / "models"
    (models / ".downloads").mkdir(parents=True)
    (models / ".downloads" / "acme--coded").symlink_to(outside)
    with HubDownload("acme/coded", models, with_code=True) as plan:
        plan.prepare()
        target = plan.complete()
    assert sorted(p.name for p in outside.iterdir()) == [".commit", "config.json"]
    assert (outside / "config.json").read_text() == "precious"
    assert target == models / "acme" / "coded" and not target.is_symlink() and target.is_dir()
    assert (target / "modeling_acme.py").read_text() == "# the repo's modelling code\n"
    assert (target / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    assert not os.path.lexists(models / ".downloads" / "acme--coded")


@pytest.mark.parametrize("planted", [".downloads", "acme"])
def test_a_link_above_the_download_or_the_model_is_refused_naming_it(hub, tmp_path, monkeypatch, planted):
    """`MODEL_CACHE_DIR/.downloads` or `MODEL_CACHE_DIR/<org>` pointing outside: the job fails naming the link and
    what to do, and nothing is written where it points."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    outside = tmp_path / "outside"
    outside.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    (models / planted).symlink_to(outside)
    served = hub.bytes_served[("acme/tiny-chat", "model.safetensors")]
    with pytest.raises(JobError,
                       match=rf"base model 'acme/tiny-chat' cannot be downloaded: {re.escape(str(models / planted))} "
                             rf"is a symbolic link \(to {re.escape(str(outside))}\).* remove the link and resubmit"):
        with HubDownload("acme/tiny-chat", models) as plan:
            plan.prepare()
            plan.complete()
    assert list(outside.iterdir()) == []
    assert hub.bytes_served[("acme/tiny-chat", "model.safetensors")] == served


def test_weights_larger_than_the_config_implies_are_refused_before_any_weight_byte(hub, tiny_qwen2, tmp_path,
                                                                                   monkeypatch):
    """The tiny model (336,448 parameters: 1.3 MB in fp32) with a 4 MB tensor it does not use in a second shard."""
    repo = hub.root / "acme" / "padded"
    shutil.copytree(tiny_qwen2, repo)
    save_file({"unused": torch.zeros(1_000_000)}, repo / "unused.safetensors")
    (repo / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "unused": "unused.safetensors"}}))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    with pytest.raises(JobError) as refused, HubDownload("acme/padded", tmp_path) as plan:
        plan.prepare()
        plan.complete()
    assert str(refused.value) == (
        "base model 'acme/padded' lists 5.1 MB of weights, more than its config.json's 336,448 parameters can take "
        "(2.6 MB: 4 bytes each, plus 25% and 1.0 MB): the repo carries files the model does not use. Pick another base "
        f"model, or put the model in {tmp_path / 'acme' / 'padded'} yourself")
    assert (hub.bytes_served[("acme/padded", "model.safetensors")]
            == hub.bytes_served[("acme/padded", "unused.safetensors")] == 0)
    assert not (tmp_path / ".downloads" / "acme--padded").exists() and not (tmp_path / "acme" / "padded").exists()


def test_a_model_over_max_model_download_bytes_is_refused_before_any_weight_byte(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    served = hub.bytes_served[("acme/tiny-chat", "model.safetensors")]
    with pytest.raises(JobError) as refused, HubDownload("acme/tiny-chat", tmp_path, max_bytes=1_000_000) as plan:
        plan.prepare()
        plan.complete()
    assert str(refused.value) == (
        "base model 'acme/tiny-chat' is 1.4 MB to download, more than MAX_MODEL_DOWNLOAD_BYTES allows "
        "(1,000,000 bytes, 1.0 MB): pick a smaller model, or raise MAX_MODEL_DOWNLOAD_BYTES on the endpoint "
        "(with room for it on the volume)")
    assert hub.bytes_served[("acme/tiny-chat", "model.safetensors")] == served
    assert not (tmp_path / ".downloads" / "acme--tiny-chat").exists()
    # the default takes Qwen3-Next-80B-A3B (the largest model documented for one GPU) in bf16
    next_80b = sum(p.numel() for p in meta_model(load_config(CONFIGS / "qwen3-next-80b-a3b.json")).parameters())
    assert 2 * next_80b < WorkerSettings.model_fields["max_model_download_bytes"].default
    assert WorkerSettings.from_env({"MAX_MODEL_DOWNLOAD_BYTES": "1000"}).max_model_download_bytes == 1000


def test_a_missing_base_model_names_the_places_searched(tmp_path):
    (tmp_path / "Qwen" / "Qwen2.5-7B").mkdir(parents=True)
    (tmp_path / "Qwen" / "Qwen2.5-7B" / "config.json").write_text("{}")
    with pytest.raises(JobError, match=r"not found; searched .*Cached models: Qwen/Qwen2.5-7B"):
        resolve_base_model("mistralai/Mistral-7B-v0.1", [tmp_path])
    assert resolve_base_model("Qwen/Qwen2.5-7B", [tmp_path]) == tmp_path / "Qwen" / "Qwen2.5-7B"
