"""The archive the app deploys: one folder inside, unpacked as the app's deployer unpacks it; uploaded to the app's
Supabase Storage (tests/supabase_server.py) standard below 6 MB and resumable (TUS) above, resumed after a cut,
replacing an earlier upload, checked, and refused by size with what to change."""

import hashlib
import io
import os
import tarfile

import pytest

from archive import TUS_CHUNK, Archive, build_archive, upload_archive
from job import JobError
from settings import WorkerSettings


def deployer_unpack(data: bytes) -> dict[str, bytes]:
    """What the app's auto-deploy-adapter does: un-tar in memory, strip one leading folder, skip hidden files."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if not name.startswith("."):
                files[name] = tar.extractfile(member).read()
    return files


def settings(supabase, tmp_path) -> WorkerSettings:
    return WorkerSettings.from_env(supabase.env | {"JOBS_DIR": str(tmp_path / "jobs")})


def synthetic(tmp_path, size: int) -> Archive:
    data = os.urandom(size)
    path = tmp_path / "job-big.tar.gz"
    path.write_bytes(data)
    return Archive(path, size, hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())


def test_the_archive_holds_one_folder_the_deployer_strips(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    files = {"adapter_model.safetensors": os.urandom(3000), "adapter_config.json": b"{}", "tokenizer.json": b"{}",
             "chat_template.jinja": b"{{ x }}", "training_config.json": b"{}", "metrics.json": b"{}"}
    for name, data in files.items():
        (adapter / name).write_bytes(data)
    archive = build_archive(adapter, tmp_path / "job-1.tar.gz")
    data = archive.path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"adapter"}
    assert deployer_unpack(data) == files
    assert archive.bytes == len(data) and archive.sha256 == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_small_archive_is_uploaded_checked_and_replaced_by_a_later_upload(supabase, tmp_path):
    config = settings(supabase, tmp_path)
    first = synthetic(tmp_path, 200_000)
    assert upload_archive(first, config, "job-1") == "lora-models/adapters/job-1.tar.gz"
    assert supabase.objects[("lora-models", "adapters/job-1.tar.gz")] == first.path.read_bytes()
    second = synthetic(tmp_path, 300_000)  # the same job delivered again: the upload replaces the first
    upload_archive(second, config, "job-1")
    assert supabase.objects[("lora-models", "adapters/job-1.tar.gz")] == second.path.read_bytes()
    assert not any(r[1].startswith("/storage/v1/upload/resumable") for r in supabase.requests)  # standard uploads


def test_a_large_archive_goes_resumable_and_a_cut_chunk_is_resumed_from_the_servers_offset(supabase, tmp_path):
    archive = synthetic(tmp_path, 2 * TUS_CHUNK + 123_457)
    supabase.cut_next_patch = 1_000_000  # the first chunk's connection drops after 1 MB
    assert upload_archive(archive, settings(supabase, tmp_path), "job-big") == "lora-models/adapters/job-big.tar.gz"
    assert supabase.objects[("lora-models", "adapters/job-big.tar.gz")] == archive.path.read_bytes()
    methods = [r[0] for r in supabase.requests if r[1].startswith("/storage/v1/upload/resumable")]
    # the cut chunk kept its first 1 MB; the upload goes on from there in 6 MiB chunks: 2 more PATCHes, not 3
    assert methods == ["POST", "PATCH", "HEAD", "PATCH", "PATCH"]


@pytest.mark.parametrize("size", [100_000, TUS_CHUNK + 1], ids=["standard", "resumable"])
def test_an_archive_above_the_projects_limit_fails_naming_its_size_and_what_to_change(supabase, tmp_path, size):
    supabase.file_size_limit = 50_000
    with pytest.raises(JobError) as exc:
        upload_archive(synthetic(tmp_path, size), settings(supabase, tmp_path), "job-2")
    message = str(exc.value)
    assert f"({size / 1e6:.1f} MB) is above the Supabase project's upload size limit" in message
    assert "lora_rank" in message and "50 MB" in message
    assert ("lora-models", "adapters/job-2.tar.gz") not in supabase.objects


def test_a_wrong_service_key_fails_the_upload_naming_the_setting(supabase, tmp_path):
    config = WorkerSettings.from_env(supabase.env | {"SUPABASE_SERVICE_ROLE_KEY": "wrong"})
    with pytest.raises(JobError, match="SUPABASE_SERVICE_ROLE_KEY"):
        upload_archive(synthetic(tmp_path, 1000), config, "job-3")
