"""Where a base model is found: the allow-list, the download switch and remote code, the cached models offered,
the app team's HF_HOME and MODEL_PATH, and a machine without the runpod SDK."""

import sys

import pytest

from job import JobError
from model_hub import find_base_model, resolve_base_model, trust_remote_code_for


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
