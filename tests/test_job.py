"""The job model: both payload shapes, every problem at once, safe job ids, plain names where patterns would be
read, finite numbers, redaction (in time linear in the text) and input values quoted shortened."""

import pytest

import handler
from conftest import SAMPLE, growth
from job import JobError, parse_job_input, redact_text, redact_url

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
    assert str(exc.value) == ("invalid job input: hyperparameters.learning_rate=0.5 is above 0.001; "
                              "gpu_config.count is missing")


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
    job, _ = parse_job_input({"dataset_url": URL,
                              "hyperparameters": {"rank": 8, "batch_size": 8, "micro_batch_size": 2}})
    hp = job.hyperparameters
    assert hp.effective_lora_alpha == 16 and hp.effective_micro_batch_size == 2 and hp.base_model is None


def test_non_http_urls_are_refused():
    with pytest.raises(JobError, match="dataset_url='s3://b/k': must be an http"):
        parse_job_input({"dataset_url": "s3://b/k"})


def test_tokens_never_survive_redaction():
    assert redact_url(URL) == "https://p.supabase.co/storage/v1/object/sign/lora-datasets/d.jsonl?<redacted>"
    assert "eyJsecret" not in redact_text(f"failed to GET {URL} after 3 tries")
    assert "pw" not in redact_url("https://user:pw@host/x")


def test_scrubbing_a_megabyte_of_text_costs_in_proportion_to_its_length_and_still_scrubs():
    # a long run of letters made the URL pattern restart at every position (quadratic): 40k characters took 4.3 s
    def text(letters: int) -> str:
        return "a" * letters + " " + URL + " " + "7" * (letters // 2)

    assert growth(redact_text, text(100_000), text(1_000_000)) < 30  # ten times the text: ~10x linear, ~100x quadratic
    megabyte = text(1_000_000)
    assert "eyJsecret" not in redact_text(megabyte) and "?<redacted>" in redact_text(megabyte)


def refusal(job_input: dict) -> JobError:
    with pytest.raises(JobError) as refused:
        parse_job_input(job_input)
    return refused.value


def test_an_input_value_is_quoted_shortened_in_the_error():
    def refused_with(digits: int) -> JobError:
        return refusal({"dataset_url": URL, "hyperparameters": {"learning_rate": "9" * digits}})

    assert growth(refused_with, 100_000, 1_000_000) < 30  # ten times the value: ~10x linear, ~100x quadratic
    message = str(refused_with(100_000))
    assert message.startswith("invalid job input: hyperparameters.learning_rate='99999") and len(message) < 400
    assert "characters" in message  # says how long the value was


@pytest.mark.parametrize("job_id", ["abc\n", "abc\r\n", "\nabc"])
def test_a_job_id_with_a_line_break_is_refused(job_id):
    with pytest.raises(JobError, match="job_id"):
        parse_job_input({"job_id": job_id, "dataset_url": URL})


@pytest.mark.parametrize("targets",
                         ["(.*.*)*X", "q_proj", ".*", ["q_proj", "(v|k)_proj"], ["q_proj", "model.layers.0.*"], ["("]])
def test_lora_target_modules_are_plain_names_never_patterns(targets):
    with pytest.raises(JobError, match=r"hyperparameters.lora_target_modules.*'all-linear' or a list of module names"):
        parse_job_input({"dataset_url": URL, "hyperparameters": {"lora_target_modules": targets}})
    job, _ = parse_job_input({"dataset_url": URL,
                              "hyperparameters": {"lora_target_modules": ["q_proj", "mlp.down_proj"]}})
    assert job.hyperparameters.lora_target_modules == ["q_proj", "mlp.down_proj"]


@pytest.mark.parametrize("field, value",
                         [("gpu_config.gpu_memory_gb", 1e999), ("gpu_config.cost_per_gpu_hour", float("nan")),
                          ("hyperparameters.lora_alpha", float("inf"))])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    section, name = field.split(".")
    spec = {"dataset_url": URL, "gpu_config": {"count": 1}, section: {name: value}}
    if section == "gpu_config":
        spec["gpu_config"] = {"count": 1, name: value}
    with pytest.raises(JobError, match=f"{field}=.*finite"):
        parse_job_input(spec)


@pytest.mark.parametrize("section", ["hyperparameters", "gpu_config"])
def test_a_deeply_nested_unknown_key_is_a_warning_not_an_internal_error(section, tmp_path, monkeypatch, storage):
    """A 500-deep value under an unknown key made the job's fingerprint fail to serialize: "internal error"."""
    monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOAD", "false")
    deep: dict = {}
    node = deep
    for _ in range(500):
        node["k"] = node = {}
    job_input = {"dataset_url": storage.url(SAMPLE.name, storage.good), "hyperparameters": {"base_model": "org/absent"},
                 "gpu_config": {"count": 1}}
    job_input[section]["notes"] = deep
    result = handler.handler({"id": "deep", "input": job_input})
    # on to the next check
    assert result["error"].startswith("loading_model:") and "org/absent" in result["error"], result
    spec, warnings = parse_job_input(job_input)
    assert warnings == [f"unknown input key ignored: {section}.notes"]
    assert "notes" not in spec.model_dump(mode="json")[section]  # carried nowhere
