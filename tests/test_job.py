"""The job model: both payload shapes, every problem at once, safe job ids, settings from the environment."""

from pathlib import Path

import pytest

from job import JobError, WorkerSettings, parse_job_input, redact_text, redact_url

URL = "https://p.supabase.co/storage/v1/object/sign/lora-datasets/d.jsonl?token=eyJsecret"


def test_both_payload_shapes_give_the_same_settings():
    a, _ = parse_job_input({"dataset_url": URL, "hyperparameters": {
        "epochs": 5, "rank": 32, "alpha": 64, "dropout": 0.1, "learning_rate": 2e-4, "batch_size": 8},
        "gpu_config": {"type": "NVIDIA A100 80GB", "count": 2}})
    b, _ = parse_job_input({"dataset_url": URL, "hyperparameters": {
        "num_epochs": 5, "lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.1, "learning_rate": 2e-4, "batch_size": 8,
        "warmup_steps": 10, "weight_decay": 0.01},
        "gpu_config": {"gpu_type": "NVIDIA A100 80GB", "num_gpus": 2, "gpu_memory_gb": 80, "cost_per_gpu_hour": 1.9}})
    for field in ("epochs", "lora_rank", "lora_alpha", "lora_dropout", "learning_rate", "batch_size"):
        assert getattr(a.hyperparameters, field) == getattr(b.hyperparameters, field), field
    assert (a.gpu_config.count, a.gpu_config.type) == (b.gpu_config.count, b.gpu_config.type) == (2, "NVIDIA A100 80GB")
    assert b.hyperparameters.warmup_steps == 10 and b.hyperparameters.weight_decay == 0.01


def test_every_problem_is_reported_at_once():
    with pytest.raises(JobError) as exc:
        parse_job_input({"dataset_url": URL, "hyperparameters": {"learning_rate": 0.5}, "gpu_config": {}})
    assert str(exc.value) == "invalid job input: hyperparameters.learning_rate=0.5 is above 0.001; gpu_config.count is missing"


@pytest.mark.parametrize("field, value, expected", [
    ("learning_rate", 1e-6, "below 1e-05"), ("batch_size", 65, "above 64"), ("num_epochs", 21, "above 20"),
    ("rank", 2, "below 4"), ("lora_rank", 256, "above 128"),
])
def test_limits_match_the_app(field, value, expected):
    with pytest.raises(JobError, match=expected):
        parse_job_input({"dataset_url": URL, "hyperparameters": {field: value}})


def test_gpu_count_is_limited_to_eight():
    with pytest.raises(JobError, match=r"gpu_config.count=9 is above 8"):
        parse_job_input({"dataset_url": URL, "gpu_config": {"count": 9}})


def test_disagreeing_aliases_are_an_error():
    with pytest.raises(JobError, match="hyperparameters.epochs=3 and hyperparameters.num_epochs=5 disagree"):
        parse_job_input({"dataset_url": URL, "hyperparameters": {"epochs": 3, "num_epochs": 5}})


@pytest.mark.parametrize("job_id", ["../etc", "a/b", "..", ".hidden", "a\\b", "x" * 129, ""])
def test_job_ids_that_could_escape_the_jobs_dir_are_refused(job_id):
    with pytest.raises(JobError, match="job_id"):
        parse_job_input({"dataset_url": URL, "job_id": job_id})


def test_unknown_keys_are_warnings_not_errors():
    job, warnings = parse_job_input({"dataset_url": URL, "colour": "red", "hyperparameters": {"fancy": 1}})
    assert warnings == ["unknown input key ignored: colour", "unknown input key ignored: hyperparameters.fancy"]
    assert job.hyperparameters.lora_rank == 16


def test_defaults_and_derived_values():
    job, _ = parse_job_input({"dataset_url": URL, "hyperparameters": {"rank": 8, "batch_size": 8, "micro_batch_size": 2}})
    hp = job.hyperparameters
    assert hp.effective_lora_alpha == 16 and hp.effective_micro_batch_size == 2 and hp.base_model is None


def test_non_http_urls_are_refused():
    with pytest.raises(JobError, match="dataset_url='s3://b/k': must be an http"):
        parse_job_input({"dataset_url": "s3://b/k"})


def test_tokens_never_survive_redaction():
    assert redact_url(URL) == "https://p.supabase.co/storage/v1/object/sign/lora-datasets/d.jsonl?<redacted>"
    assert "eyJsecret" not in redact_text(f"failed to GET {URL} after 3 tries")
    assert "pw" not in redact_url("https://user:pw@host/x")


def test_settings_come_from_the_given_environment():
    settings = WorkerSettings.from_env({"JOBS_DIR": "/tmp/j", "ALLOW_FILE_URLS": "true", "DOWNLOAD_RETRIES": "2"})
    assert str(settings.jobs_dir) == "/tmp/j" and settings.allow_file_urls and settings.download_retries == 2
    assert WorkerSettings.from_env({}).default_base_model == "mistralai/Mistral-7B-v0.1"
    with pytest.raises(JobError, match="ALLOW_FILE_URLS='maybe' is not a boolean"):
        WorkerSettings.from_env({"ALLOW_FILE_URLS": "maybe"})


def test_storage_that_cannot_sign_download_links_is_refused_naming_what_to_set():
    runpod_s3 = {"S3_ENDPOINT_URL": "https://s3api-eu-ro-1.runpod.io", "S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s",
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
    with pytest.raises(JobError, match="no storage for the adapter's files.*S3_ENDPOINT_URL, S3_BUCKET.*VOLUME_DELIVERY=true"):
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
    from job import LOCAL_VOLUME

    if Path("/runpod-volume").is_dir():
        pytest.skip("this machine has a /runpod-volume")
    settings = WorkerSettings.from_env({})
    assert settings.jobs_dir == LOCAL_VOLUME / "lora-jobs" and settings.model_cache_dir == LOCAL_VOLUME / "models"
    assert WorkerSettings.from_env({"RUNPOD_ENDPOINT_ID": "ep", "VOLUME_DELIVERY": "1"}).jobs_dir == Path("/runpod-volume/lora-jobs")


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
    import job

    runpod_volume, workspace = tmp_path / "runpod-volume", tmp_path / "workspace"
    monkeypatch.setattr(job, "VOLUME_MOUNTS", (runpod_volume, workspace))
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
    assert WorkerSettings.from_env(SUPABASE | {"SUPABASE_SERVICE_ROLE_KEY": "service-role-key\n"}).supabase_service_role_key \
        == "service-role-key"
    with pytest.raises(JobError, match="SUPABASE_SERVICE_ROLE_KEY holds spaces or control characters") as refused:
        WorkerSettings.from_env(SUPABASE | {"SUPABASE_SERVICE_ROLE_KEY": "eyJsecret part2"})
    assert "eyJsecret" not in str(refused.value)
