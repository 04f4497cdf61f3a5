"""The chat templates users' base models publish (tests/fixtures/chat_templates/, sources in SOURCES.md), on their
models' own vocabularies where a package ships one (tiny_model.CHAT_TEMPLATE_VOCABULARIES): what is trained, where
the system prompt goes, what closes a turn, and that the template saved with the adapter renders the same way."""

import json
from itertools import groupby

import pytest
from transformers import AutoTokenizer

from chat_labels import IGNORE, tokenize_conversation, trained_char_spans, trained_runs
from chat_templates import NON_THINKING_PRELUDE, SkipExample, prepare_chat_template, render, supports_tools
from conftest import SAMPLE
from dataset_loader import load_dataset
from job import Hyperparameters
from labelled_data import label_conversations
from tiny_model import CHAT_TEMPLATE_VOCABULARIES, build_tiny_model, chat_template_tokenizer
from train_lora import train

TEMPLATES = sorted(CHAT_TEMPLATE_VOCABULARIES)
SYSTEM = "You are Maya, a calm financial coach. Never promise returns."
MULTI_TURN = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "How much should I save each month?"},
    {"role": "assistant", "content": "Start with ten percent of what you take home.", "weight": 1},
    {"role": "user", "content": "And if that is too much?"},
    {"role": "assistant", "content": "An earlier draft, not to be trained.", "weight": 0},
    {"role": "user", "content": "Really, what then?"},
    {"role": "assistant", "content": "Then save five percent, and raise it with every pay rise.", "weight": 1},
]}
TOOLS = [{"type": "function", "function": {"name": "get_rate", "description": "Exchange rate",
                                           "parameters": {"type": "object",
                                                          "properties": {"pair": {"type": "string"}}}}}]
TOOL_CALL = {"tools": TOOLS, "messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is EUR/USD?"},
    {"role": "assistant", "content": "", "weight": 1, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_rate", "arguments": {"pair": "EURUSD"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "1.0842"},
    {"role": "assistant", "content": "It is about 1.08 right now.", "weight": 1},
]}
# templates that render tool calls, and those that cannot train them faithfully (the reason is asserted below).
# The template drops them: SmolLM3 always; R1-distill unless content is null, a key transformers 5 removes before
# rendering (then the template fails).
TOOL_CALLS_SKIPPED = {
    "HuggingFaceTB-SmolLM3-3B": "does not render the tool calls",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "does not render the tool calls"}


@pytest.fixture(scope="module", params=TEMPLATES)
def chat(request):
    tokenizer = chat_template_tokenizer(request.param)
    return request.param, tokenizer, prepare_chat_template(tokenizer)


def test_each_published_template_trains_exactly_the_answers_and_keeps_the_system_prompt(chat):
    name, tokenizer, fmt = chat
    conversations, _ = load_dataset(SAMPLE)  # 44 BrightRun pairs: system prompt, history (weight 0), one target
    for conversation in conversations + [MULTI_TURN]:
        example = tokenize_conversation(tokenizer, conversation, 4096, fmt.end_of_turn)  # none is skipped
        expected = [m["content"].strip() + fmt.end_of_turn for m in conversation["messages"]
                    if m["role"] == "assistant" and m.get("weight", 1)]
        # exactly each trained answer and the token closing its turn: nothing of the system, user or weight-0 turns
        assert [run.lstrip() for run in trained_runs(tokenizer, example)] == expected, name
        system = conversation["messages"][0]["content"].strip()
        assert system in tokenizer.decode(example.input_ids), f"{name}: the system prompt is not in what the model sees"
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(fmt.end_of_turn)) != [tokenizer.unk_token_id]


ECHO = {"messages": [  # the answer's words are in the question too: its own copy must be trained, not the user's
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Is the sky green? Reply with one word: no"},
    {"role": "assistant", "content": "no", "weight": 1},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome.", "weight": 1},
]}
REPEATED = {"messages": [  # a weight-0 answer identical to the trained one, earlier in the conversation
    {"role": "user", "content": "Can you check my budget?"},
    {"role": "assistant", "content": "Sure.", "weight": 0},
    {"role": "user", "content": "Please do."},
    {"role": "assistant", "content": "Sure.", "weight": 1},
]}


def test_the_answer_trained_is_the_assistants_own_copy_of_its_words(chat):
    name, tokenizer, fmt = chat
    full, spans = trained_char_spans(tokenizer, ECHO["messages"], None, fmt.end_of_turn)
    question = "Reply with one word: no"
    assert [full[a:b].lstrip() for a, b in spans] == ["no" + fmt.end_of_turn, "You are welcome." + fmt.end_of_turn]
    assert full.index(question) + len(question) <= spans[0][0], name
    full, spans = trained_char_spans(tokenizer, REPEATED["messages"], None, fmt.end_of_turn)
    assert len(spans) == 1 and full.index("Please do.") < spans[0][0], name
    example = tokenize_conversation(tokenizer, REPEATED, 4096, fmt.end_of_turn)
    assert [run.lstrip() for run in trained_runs(tokenizer, example)] == ["Sure." + fmt.end_of_turn]


def test_tool_calls_are_trained_and_tool_results_are_not_or_the_reason_is_given(chat):
    name, tokenizer, fmt = chat
    if not supports_tools(tokenizer):
        with pytest.raises(SkipExample, match="cannot render tool messages"):
            tokenize_conversation(tokenizer, TOOL_CALL, 4096, fmt.end_of_turn)
        return
    if name in TOOL_CALLS_SKIPPED:
        with pytest.raises(SkipExample, match=TOOL_CALLS_SKIPPED[name]):
            tokenize_conversation(tokenizer, TOOL_CALL, 4096, fmt.end_of_turn)
        return
    runs = [run.lstrip() for run in trained_runs(tokenizer,
                                                 tokenize_conversation(tokenizer, TOOL_CALL, 4096, fmt.end_of_turn))]
    assert len(runs) == 2 and "get_rate" in runs[0] and "EURUSD" in runs[0] and runs[0].endswith(fmt.end_of_turn)
    assert runs[1] == "It is about 1.08 right now." + fmt.end_of_turn
    assert not any("1.0842" in run for run in runs)  # the tool's result is context


PLACED = {  # where the published template puts a system prompt the training conversation's rendering would lose
    "google-gemma-2-2b-it": ("first user turn", f"<start_of_turn>user\n{SYSTEM}\n\nHow much should I save each month?"),
    "mistralai-Mistral-7B-Instruct-v0.3.reconstructed": ("last user turn",
                                                         f"[INST] {SYSTEM}\n\nReally, what then?[/INST]"),
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_template_that_drops_or_refuses_the_system_prompt_gets_it_where_its_format_puts_it(name, tmp_path):
    tokenizer = chat_template_tokenizer(name)
    published = tokenizer.chat_template
    fmt = prepare_chat_template(tokenizer)
    placement, rendered = PLACED.get(name, ("template", None))
    assert fmt.system_prompt == placement
    text = render(tokenizer, MULTI_TURN["messages"])
    if rendered:
        assert rendered in text and text.count(SYSTEM) == 1
    else:  # used as published (a hybrid reasoning template: in its non-thinking mode)
        assert tokenizer.chat_template in (published, NON_THINKING_PRELUDE + published)
    # the template saved with the adapter renders a chat at inference as training rendered it: the prompt up to
    # the user's last question, then the generation prompt, is what the trained answer followed (non-thinking
    # mode for the hybrid reasoning templates, by default: answers train with Qwen3's empty think block)
    tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    asked = saved.apply_chat_template(MULTI_TURN["messages"][:6], tokenize=False, add_generation_prompt=True)
    assert SYSTEM in asked  # by default: a hybrid reasoning template's saved prelude turns thinking off
    assert asked == saved.apply_chat_template(MULTI_TURN["messages"][:6], tokenize=False, add_generation_prompt=True,
                                              enable_thinking=False)
    if name in GENERATION_PROMPT_DIFFERS:
        assert not text.startswith(asked)
        return
    answer = MULTI_TURN["messages"][6]["content"]
    assert text.startswith(asked) and text[len(asked):].lstrip().startswith(answer), name


# The R1 distills' generation prompt opens a think block (`<｜Assistant｜><think>\n`) that their template does not
# render before an answer in a conversation: answers without reasoning train as the template renders them (TRAINING.md).
GENERATION_PROMPT_DIFFERS = {"deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"}


def test_a_trailing_end_of_text_is_not_taken_for_the_end_of_each_turn():
    """Phi-3.5 appends <|endoftext|> after the last turn: each answer closes with <|end|>, which is trained, and the
    trailing <|endoftext|> is not."""
    tokenizer = chat_template_tokenizer("microsoft-Phi-3.5-mini-instruct")
    fmt = prepare_chat_template(tokenizer)
    assert fmt.end_of_turn == "<|end|>"
    example = tokenize_conversation(tokenizer, MULTI_TURN, 4096, fmt.end_of_turn)
    assert [run for run in trained_runs(tokenizer, example)] == [
        "Start with ten percent of what you take home.<|end|>",
        "Then save five percent, and raise it with every pay rise.<|end|>"]
    assert tokenizer.convert_ids_to_tokens(example.input_ids[-1]) == "<|endoftext|>" and example.labels[-1] == IGNORE


def test_mistral_v0_2_keeps_the_system_prompt_in_the_first_user_turn_and_trains_each_answer_and_its_eos():
    """Mistral-7B-Instruct-v0.2's 2024 template on its own (v1) vocabulary, where `[INST]` and `[/INST]` are plain text:
    `<s> [INST] system\\n\\nuser [/INST] answer</s> [INST] user [/INST] answer</s>`. The template itself puts the system
    prompt in the first user turn (no prelude), and what is trained is each weighted answer's tokens and `</s>`."""
    tokenizer = chat_template_tokenizer("mistralai-Mistral-7B-Instruct-v0.2")
    published = tokenizer.chat_template
    fmt = prepare_chat_template(tokenizer)
    assert (fmt.end_of_turn, fmt.system_prompt, tokenizer.chat_template) == ("</s>", "template", published)
    unk = tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids(["<s>", "</s>", "[INST]", "[/INST]"]) == [1, 2, unk, unk]
    conversations, _ = load_dataset(SAMPLE)  # BrightRun: system, user, then weight-0 history, one trained answer
    examples, report = label_conversations(tokenizer, conversations, 4096, fmt.end_of_turn)
    assert report["dropped"] == 0 and len(examples) == len(conversations)  # no example skipped
    assert not any(e.dropped_messages or e.truncated for e in examples)
    for conversation, example in zip(conversations, examples):
        system, *turns = conversation["messages"]
        expected = "<s>"
        for k in range(0, len(turns), 2):
            user, answer = turns[k], turns[k + 1]
            first = system["content"] + "\n\n" if k == 0 else ""
            expected += f" [INST] {first}{user['content']} [/INST] {answer['content']}</s>"
        assert render(tokenizer, conversation["messages"]) == expected
        assert list(example.input_ids) == tokenizer(expected, add_special_tokens=False)["input_ids"]
        trained = [(i, label) for i, label in zip(example.input_ids, example.labels) if label != IGNORE]
        assert all(i == label for i, label in trained)
        answers = [m["content"] for m in turns if m["role"] == "assistant" and m.get("weight", 1)]
        runs = [[label for _, label in run] for is_trained, run in
                groupby(zip(example.input_ids, example.labels), key=lambda pair: pair[1] != IGNORE) if is_trained]
        # the space the template writes before an answer is SentencePiece's "▁" on the answer's first word
        assert runs == [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]


def test_where_the_system_prompt_went_is_recorded_in_the_report_and_the_training_config(tmp_path):
    model = build_tiny_model("qwen2", tmp_path / "gemma-2-chat", chat_template="google-gemma-2-2b-it")
    hp = Hyperparameters(max_steps=1, batch_size=2, max_seq_length=512, lora_rank=4, val_fraction=0)
    result = train(load_dataset(SAMPLE)[0][:4], model, tmp_path / "adapter", hp)
    described = result.metrics["chat_format"]
    assert (described["end_of_turn"] == "<end_of_turn>"
            and described["system_prompt"].startswith("merged into the first user turn"))
    config = json.loads((tmp_path / "adapter" / "training_config.json").read_text())
    assert config["effective"]["chat_format"] == described
    saved = AutoTokenizer.from_pretrained(tmp_path / "adapter")  # the adapter's template takes a system prompt
    assert SYSTEM in saved.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": "Hi"}],
                                               tokenize=False, add_generation_prompt=True)


def test_named_templates_each_get_the_prelude():
    tokenizer = chat_template_tokenizer("google-gemma-2-2b-it")
    tokenizer.chat_template = {"default": tokenizer.chat_template, "tool_use": tokenizer.chat_template}
    fmt = prepare_chat_template(tokenizer)
    assert fmt.system_prompt == "first user turn"
    assert all(t.startswith("{%- if messages and messages[0]['role'] == 'system'")
               for t in tokenizer.chat_template.values())
    example = tokenize_conversation(tokenizer, MULTI_TURN, 4096, fmt.end_of_turn)  # no longer refused
    assert SYSTEM in tokenizer.decode(example.input_ids)
