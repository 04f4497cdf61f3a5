"""No input can make a stage work out of proportion to its size, or reach the worker as anything but plain data.
Bounds are ratios or generous limits measured in one run, never tight timings."""

import time

import pytest

from job import JobError, parse_job_input, redact_text

URL = "https://p.supabase.co/storage/v1/object/sign/lora-datasets/d.jsonl?token=eyJsecret"


def seconds(call, *args, **kwargs) -> float:
    start = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - start


def test_scrubbing_a_megabyte_of_text_takes_under_a_second_and_still_scrubs():
    # a long run of letters made the URL pattern restart at every position: 40k characters took 4.3 s
    text = "a" * 1_000_000 + " " + URL + " " + "7" * 500_000
    assert seconds(redact_text, text) < 1.0
    assert "eyJsecret" not in redact_text(text) and "?<redacted>" in redact_text(text)


def test_an_input_value_is_quoted_shortened_in_the_error():
    start = time.perf_counter()
    with pytest.raises(JobError) as refused:
        parse_job_input({"dataset_url": URL, "hyperparameters": {"learning_rate": "9" * 100_000}})
    assert time.perf_counter() - start < 1.0
    message = str(refused.value)
    assert message.startswith("invalid job input: hyperparameters.learning_rate='99999") and len(message) < 400
    assert "characters" in message  # says how long the value was


@pytest.mark.parametrize("job_id", ["abc\n", "abc\r\n", "\nabc"])
def test_a_job_id_with_a_line_break_is_refused(job_id):
    with pytest.raises(JobError, match="job_id"):
        parse_job_input({"job_id": job_id, "dataset_url": URL})


@pytest.mark.parametrize("targets", ["(.*.*)*X", "q_proj", ".*", ["q_proj", "(v|k)_proj"], ["q_proj", "model.layers.0.*"], ["("]])
def test_lora_target_modules_are_plain_names_never_patterns(targets):
    with pytest.raises(JobError, match=r"hyperparameters.lora_target_modules.*'all-linear' or a list of module names"):
        parse_job_input({"dataset_url": URL, "hyperparameters": {"lora_target_modules": targets}})
    job, _ = parse_job_input({"dataset_url": URL, "hyperparameters": {"lora_target_modules": ["q_proj", "mlp.down_proj"]}})
    assert job.hyperparameters.lora_target_modules == ["q_proj", "mlp.down_proj"]


@pytest.mark.parametrize("field, value", [("gpu_config.gpu_memory_gb", 1e999), ("gpu_config.cost_per_gpu_hour", float("nan")),
                                          ("hyperparameters.lora_alpha", float("inf"))])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    section, name = field.split(".")
    spec = {"dataset_url": URL, "gpu_config": {"count": 1}, section: {name: value}}
    if section == "gpu_config":
        spec["gpu_config"] = {"count": 1, name: value}
    with pytest.raises(JobError, match=f"{field}=.*finite"):
        parse_job_input(spec)


def chat_of(messages: int, words: int = 6) -> dict:
    turns = []
    for i in range(messages // 2):
        turns += [{"role": "user", "content": f"question {i} " + "word " * words},
                  {"role": "assistant", "content": f"answer {i} " + "word " * words, "weight": 1}]
    return {"messages": [{"role": "system", "content": "Be brief."}] + turns}


def test_shortening_a_long_conversation_costs_in_proportion_to_its_length(tiny_qwen2):
    """Dropping one turn and labelling again (each labelling rendering every prefix) was cubic: 800 messages took
    270 s where 100 took 0.03 s. Now labelling 800 costs at most 20x labelling 100."""
    from transformers import AutoTokenizer

    from chat_labels import prepare_chat_template, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = prepare_chat_template(tokenizer).end_of_turn
    tokenize_conversation(tokenizer, chat_of(10), 2048, eot)  # warm-up
    short = min(seconds(tokenize_conversation, tokenizer, chat_of(100), 2048, eot) for _ in range(3))
    long_example = tokenize_conversation(tokenizer, chat_of(800), 2048, eot)
    long = min(seconds(tokenize_conversation, tokenizer, chat_of(800), 2048, eot) for _ in range(3))
    assert long <= 20 * short, (long, short)
    assert long_example.dropped_messages > 0 and len(long_example.input_ids) <= 2048 and not long_example.truncated


def test_a_ten_megabyte_message_costs_what_a_fitting_one_does(tiny_qwen2):
    from transformers import AutoTokenizer

    from chat_labels import prepare_chat_template, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = prepare_chat_template(tokenizer).end_of_turn
    huge = {"messages": [{"role": "user", "content": "Summarise this."},
                         {"role": "assistant", "content": "word " * 2_000_000, "weight": 1}]}
    assert seconds(tokenize_conversation, tokenizer, huge, 2048, eot) < 10.0  # it took 26 s and 1.9 GB
    example = tokenize_conversation(tokenizer, huge, 2048, eot)
    assert example.truncated and len(example.input_ids) == 2048
