"""The worker's settings: read from the given environment, strict booleans, storage the app can download from,
the network volume wherever it is mounted."""

from pathlib import Path

import pytest

from job import JobError
from settings import LOCAL_VOLUME, WorkerSettings


def test_settings_come_from_the_given_environment():
    settings = WorkerSettings.from_env({"JOBS_DIR": "/tmp/j", "ALLOW_FILE_URLS": "true", "DOWNLOAD_RETRIES": "2"})
    assert str(settings.jobs_dir) == "/tmp/j" and settings.allow_file_urls and settings.download_retries == 2
    assert WorkerSettings.from_env({}).default_base_model == "mistralai/Mistral-7B-v0.1"
    with pytest.raises(JobError, match="ALLOW_FILE_URLS='maybe' is not a boolean"):
        WorkerSettings.from_env({"ALLOW_FILE_URLS": "maybe"})


def test_storage_that_cannot_sign_download_links_is_refused_naming_what_to_set():
    runpod_s3 = {"S3_ENDPOINT_URL": "https://s3api-eu-ro-1.runpod.io", "S3_ACCESS_KEY_ID": "k",
                 "S3_SECRET_ACCESS_KEY": "s",
                 "NETWORK_VOLUME_ID": "vol-123", "RUNPOD_ENDPOINT_ID": "ep"}
    with pytest.raises(JobError) as refused:
        WorkerSettings.from_env(runpod_s3)
    message = str(refused.value)
    assert "does not support presigned URLs" in message and "NETWORK_VOLUME_ID='vol-123' is not read" in message
    assert "supabase.co/storage/v1/s3" in message and "S3_BUCKET" in message
    with pytest.raises(JobError, match="presigned"):  # a bucket named as the worker reads it does not help
        WorkerSettings.from_env(runpod_s3 | {"S3_BUCKET": "vol-123"})
    with pytest.raises(JobError, match="half configured: S3_BUCKET not set.*NETWORK_VOLUME_ID"):
        WorkerSettings.from_env(runpod_s3 | {"S3_ENDPOINT_URL": "https://p.supabase.co/storage/v1/s3"})


def test_an_endpoint_needs_storage_or_explicit_volume_delivery_and_a_local_run_needs_neither(tmp_path):
    with pytest.raises(JobError,
                       match="no storage for the adapter's files.*S3_ENDPOINT_URL, S3_BUCKET.*VOLUME_DELIVERY=true"):
        WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep"})
    on_volume = WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep", "VOLUME_DELIVERY": "true"})
    assert on_volume.volume_delivery and not on_volume.allow_file_urls
    s3 = {"S3_ENDPOINT_URL": "https://p.supabase.co/storage/v1/s3", "S3_BUCKET": "lora-models"}
    assert WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep"} | s3).s3_configured
    with pytest.raises(JobError, match="choose one"):
        WorkerSettings.from_env(s3 | {"VOLUME_DELIVERY": "true"})
    local = WorkerSettings.from_env({"JOBS_DIR": str(tmp_path)})
    assert not local.allow_file_urls and not local.on_endpoint and not local.s3_configured
    with pytest.raises(JobError, match="S3_ENDPOINT_URL='p.supabase.co/storage/v1/s3' is not an http"):
        WorkerSettings.from_env(s3 | {"S3_ENDPOINT_URL": "p.supabase.co/storage/v1/s3"})
    with pytest.raises(JobError, match="SigV4"):
        WorkerSettings.from_env(s3 | {"PRESIGNED_URL_EXPIRY_S": "2000000"})


def test_a_local_run_without_the_volume_keeps_its_files_in_the_checkout():
    if Path("/runpod-volume").is_dir():
        pytest.skip("this machine has a /runpod-volume")
    settings = WorkerSettings.from_env({})
    assert settings.jobs_dir == LOCAL_VOLUME / "lora-jobs" and settings.model_cache_dir == LOCAL_VOLUME / "models"
    on_endpoint = WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep", "VOLUME_DELIVERY": "1"})
    assert on_endpoint.jobs_dir == Path("/runpod-volume/lora-jobs")


SUPABASE = {"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": "service-role-key"}


def test_the_app_teams_environment_is_accepted_and_its_volume_s3_endpoint_ignored_with_a_warning():
    """As the app's team deploys (shared/contracts/brightrun-app.md): Supabase, plus RunPod's volume S3 API, its keys
    and NETWORK_VOLUME_ID, and no S3_BUCKET. The archive goes to Supabase; S3 is not used, and a warning says so."""
    team = SUPABASE | {"S3_ENDPOINT_URL": "https://s3api-eu-ro-1.runpod.io", "S3_ACCESS_KEY_ID": "k",
                       "S3_SECRET_ACCESS_KEY": "s", "NETWORK_VOLUME_ID": "vol-123", "RUNPOD_ENDPOINT_ID": "ep"}
    settings = WorkerSettings.from_env(team)
    assert settings.supabase_configured and not settings.s3_configured and settings.s3_ignored
    [warning] = [w for w in settings.warnings(team) if "S3" in w]
    assert "s3api-eu-ro-1.runpod.io" in warning and "Supabase Storage" in warning and "ignored" in warning
    # Supabase alone is enough storage for an endpoint; half of it is refused, naming the missing variable
    assert WorkerSettings.from_env(SUPABASE | {"RUNPOD_ENDPOINT_ID": "ep"}).supabase_configured
    with pytest.raises(JobError, match="half configured: SUPABASE_SERVICE_ROLE_KEY is not set"):
        WorkerSettings.from_env({"SUPABASE_URL": "https://p.supabase.co"})
    with pytest.raises(JobError, match="SUPABASE_URL='p.supabase.co' is not an http"):
        WorkerSettings.from_env(SUPABASE | {"SUPABASE_URL": "p.supabase.co"})
    with pytest.raises(JobError, match="Set SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"):
        WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep"})


def test_job_directories_go_on_the_volume_wherever_it_is_mounted(tmp_path, monkeypatch):
    """/runpod-volume on serverless workers; the app's team mounts theirs at /workspace: jobs (checkpoints) and models
    go there, never on the container's disk; with no volume at all on an endpoint, a warning says what is lost."""
    runpod_volume, workspace = tmp_path / "runpod-volume", tmp_path / "workspace"
    monkeypatch.setattr("settings.VOLUME_MOUNTS", (runpod_volume, workspace))
    workspace.mkdir()
    on_workspace = WorkerSettings.from_env(SUPABASE | {"RUNPOD_ENDPOINT_ID": "ep"})
    assert on_workspace.jobs_dir == workspace / "lora-jobs" and on_workspace.model_cache_dir == workspace / "models"
    assert on_workspace.runpod_model_cache == workspace / "huggingface-cache" / "hub"
    assert on_workspace.warnings({}) == []
    runpod_volume.mkdir()
    assert WorkerSettings.from_env(SUPABASE | {"RUNPOD_ENDPOINT_ID": "ep"}).jobs_dir == runpod_volume / "lora-jobs"
    runpod_volume.rmdir()
    workspace.rmdir()
    bare = WorkerSettings.from_env(SUPABASE | {"RUNPOD_ENDPOINT_ID": "ep"})
    [warning] = bare.warnings({})
    assert "no network volume is mounted" in warning and "lost when the worker stops" in warning


def test_a_service_key_pasted_with_a_newline_is_trimmed_and_one_with_spaces_refused_without_quoting_it():
    pasted = WorkerSettings.from_env(SUPABASE | {"SUPABASE_SERVICE_ROLE_KEY": "service-role-key\n"})
    assert pasted.supabase_service_role_key == "service-role-key"
    with pytest.raises(JobError, match="SUPABASE_SERVICE_ROLE_KEY holds spaces or control characters") as refused:
        WorkerSettings.from_env(SUPABASE | {"SUPABASE_SERVICE_ROLE_KEY": "eyJsecret part2"})
    assert "eyJsecret" not in str(refused.value)


def test_other_names_a_setting_is_read_from_and_invalid_numbers_named_with_their_variable():
    s3 = {"BUCKET_ENDPOINT_URL": "https://p.supabase.co/storage/v1/s3", "BUCKET_NAME": "lora-models",
          "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s"}
    settings = WorkerSettings.from_env(s3 | {"S3_BUCKET": "", "DOWNLOAD_TIMEOUT_S": " 5 "})
    assert (settings.s3_endpoint_url, settings.s3_bucket, settings.s3_access_key_id) == (
        "https://p.supabase.co/storage/v1/s3", "lora-models", "k")  # an empty S3_BUCKET is not set
    assert settings.s3_configured and settings.download_timeout_s == 5.0
    assert WorkerSettings.from_env(s3 | {"S3_BUCKET": "first"}).s3_bucket == "first"
    for value in ("many", "4.0"):  # parsed as Python parses an int, its reason Python's own
        with pytest.raises(JobError, match=rf"DOWNLOAD_RETRIES='{value}' is invalid: invalid literal for int\(\)"):
            WorkerSettings.from_env({"DOWNLOAD_RETRIES": value})
    with pytest.raises(JobError, match=r"DOWNLOAD_TIMEOUT_S='soon' is invalid: could not convert string to float"):
        WorkerSettings.from_env({"DOWNLOAD_TIMEOUT_S": "soon"})
    with pytest.raises(JobError, match="KEEP_QUANTIZED_BASE='y' is not a boolean; use true or false"):
        WorkerSettings.from_env({"KEEP_QUANTIZED_BASE": "y"})
