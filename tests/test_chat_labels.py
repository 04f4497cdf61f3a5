"""Labels: exactly the assistant's words plus the end-of-turn token, for a ChatML and a template-less
SentencePiece-style base model; packing that isolates examples; labelling that costs in proportion to what is kept,
in time and memory, however long the conversation."""

import gc
import json
import subprocess
import sys
import tracemalloc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chat_labels
from chat_formats import finalize, normalize_openai
from chat_labels import IGNORE, Example, collate, pack_examples, tokenize_conversation, trained_runs
from chat_templates import SkipExample, end_of_turn_text, ensure_chat_template, prepare_chat_template
from conftest import ROOT, seconds

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are a careful financial planner."},
    {"role": "user", "content": "Should I pay off my mortgage early?"},
    {"role": "assistant", "content": "It depends on your rate and your savings.", "weight": 0},
    {"role": "user", "content": "My rate is 6 percent and I have savings."},
    {"role": "assistant", "content": "Then paying it down early is a safe return.", "weight": 1},
]}


def labelled(model_dir, conversation=CONVERSATION, max_len=2048):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = ensure_chat_template(tokenizer)
    eot = end_of_turn_text(tokenizer)
    return tokenizer, source, eot, tokenize_conversation(tokenizer, conversation, max_len, eot)


def test_chatml_trains_the_target_and_im_end_only(tiny_qwen2):
    tokenizer, source, eot, example = labelled(tiny_qwen2)
    assert source == "tokenizer" and eot == "<|im_end|>"
    assert tokenizer.eos_token == "<|endoftext|>"  # EOS is not the end-of-turn token: im_end is what is trained
    assert trained_runs(tokenizer, example) == ["Then paying it down early is a safe return.<|im_end|>"]


def test_template_less_sentencepiece_model_gets_a_default_inst_template(tiny_mistral):
    tokenizer, source, eot, example = labelled(tiny_mistral)
    assert source == "default-inst" and eot == "</s>"
    runs = trained_runs(tokenizer, example)
    # the leading space merges into the first word ("▁Then"): it is trained with it
    assert [r.strip() for r in runs] == ["Then paying it down early is a safe return.</s>"]


def test_every_trained_assistant_message_is_one_run_and_no_user_token_is_trained(tiny_qwen2):
    conversation = {"messages": [dict(m, weight=1) if m["role"] == "assistant" else m
                                 for m in CONVERSATION["messages"]]}
    tokenizer, _, _, example = labelled(tiny_qwen2, conversation)
    assert trained_runs(tokenizer, example) == ["It depends on your rate and your savings.<|im_end|>",
                                                "Then paying it down early is a safe return.<|im_end|>"]
    trained_text = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])
    for message in conversation["messages"]:
        if message["role"] != "assistant":
            assert message["content"] not in trained_text


def test_too_long_conversations_lose_their_oldest_turns_first(tiny_qwen2):
    tokenizer, _, eot, full = labelled(tiny_qwen2)
    shorter = tokenize_conversation(tokenizer, CONVERSATION, len(full.input_ids) - 1, eot)
    assert shorter.dropped_messages == 2 and not shorter.truncated
    text = tokenizer.decode(shorter.input_ids)
    assert "careful financial planner" in text and "Should I pay off" not in text
    assert trained_runs(tokenizer, shorter) == ["Then paying it down early is a safe return.<|im_end|>"]
    cut = tokenize_conversation(tokenizer, CONVERSATION, len(shorter.input_ids) - 3, eot)
    assert cut.truncated and len(cut.input_ids) == len(shorter.input_ids) - 3 and cut.num_trained > 0


def test_turns_beyond_the_text_budget_are_left_out_unrendered_and_counted(tiny_qwen2, monkeypatch):
    """A conversation's text is held to 32 bytes a token of max_seq_length (8,192 at 256) before anything is rendered:
    its oldest turns beyond that are dropped as too-long ones are, the system prompt and the trained answer kept."""
    rendered = []
    render = chat_labels.render
    monkeypatch.setattr(chat_labels, "render",
                        lambda *args, **kwargs: rendered.append(render(*args, **kwargs)) or rendered[-1])
    long_turn = [{"role": "user", "content": "context " * 2000},
                 {"role": "assistant", "content": "Noted.", "weight": 1}]
    conversation = {"messages": CONVERSATION["messages"][:1] + long_turn + CONVERSATION["messages"][3:]}
    tokenizer, _, _, example = labelled(tiny_qwen2, conversation, max_len=256)
    assert example.dropped_messages == 2 and not example.truncated
    assert trained_runs(tokenizer, example) == ["Then paying it down early is a safe return.<|im_end|>"]
    assert "careful financial planner" in tokenizer.decode(example.input_ids)
    assert rendered and not any("context context" in text for text in rendered)


def test_packed_examples_do_not_see_each_other(tiny_qwen2):
    """The packed batch's per-example losses equal the unpacked ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = end_of_turn_text(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = [tokenize_conversation(tokenizer, {"messages": [
        {"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
        {"role": "assistant", "content": f"The answer is {2 * i}, as always." * (i + 1)}]}, 512, eot) for i in range(3)]
    packs = pack_examples(examples, 512)
    assert len(packs) == 1 and len(packs[0]) == 3

    def per_token_losses(batch):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none",
                                                   ignore_index=IGNORE)
        return losses[labels.flatten() != IGNORE]

    packed = per_token_losses(collate(packs, tokenizer.pad_token_id))
    alone = torch.cat([per_token_losses(collate([[e]], tokenizer.pad_token_id)) for e in packs[0]])
    assert packed.shape == alone.shape
    assert torch.allclose(packed, alone, atol=1e-5)


def test_padding_is_never_trained_nor_attended(tiny_qwen2):
    tokenizer, _, eot, example = labelled(tiny_qwen2)
    short = tokenize_conversation(tokenizer, {"messages": CONVERSATION["messages"][3:]}, 2048, eot)
    batch = collate([[example], [short]], tokenizer.pad_token_id)
    pad = len(example.input_ids) - len(short.input_ids)
    assert pad > 0 and (batch["labels"][1, -pad:] == IGNORE).all()
    assert batch["attention_mask"].shape == (2, len(example.input_ids))  # one example per row: a padding mask
    assert batch["attention_mask"][1, -pad:].sum() == 0 and batch["attention_mask"][1, :-pad].all()
    packed = collate([[example, short], [short]], tokenizer.pad_token_id)["attention_mask"]
    n = len(example.input_ids)
    assert packed.shape[1] == 1 and not packed[0, 0, n:, :n].any()  # packed: the second example cannot see the first
    assert batch["real_tokens"] == len(example.input_ids) + len(short.input_ids)
    assert (batch["trained_tokens"] == example.num_trained + short.num_trained
            == int((batch["labels"][:, 1:] != IGNORE).sum()))
    # The loss's positions, found on the CPU: each predicts the token after it, and that token is trained.
    for b in (batch, collate([[example, short], [short]], tokenizer.pad_token_id)):
        assert len(b["loss_targets"]) == b["trained_tokens"]
        assert torch.equal(b["input_ids"].flatten()[b["loss_index"] + 1], b["loss_targets"])
        assert torch.equal(b["loss_targets"], b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE])


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments }})</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_conversation():
    return json.loads((ROOT / "tests" / "fixtures" / "openai_tools.jsonl").read_text().splitlines()[0])


def test_tool_calls_are_trained_and_tool_results_are_not(tiny_qwen2):
    record = tool_conversation()
    messages, _ = finalize(normalize_openai(record))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    tokenizer.chat_template = TOOL_TEMPLATE
    eot = end_of_turn_text(tokenizer)
    example = tokenize_conversation(tokenizer, {"messages": messages, "tools": record["tools"]}, 2048, eot)
    assert trained_runs(tokenizer, example) == ["<tool_call>get_rate({})</tool_call><|im_end|>",
                                                "Today's 30-year rate is 6.1%.<|im_end|>"]


def test_tools_with_a_template_that_cannot_render_them_are_skipped_with_the_reason(tiny_qwen2):
    messages, _ = finalize(normalize_openai(tool_conversation()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    with pytest.raises(SkipExample, match="uses tools but the chat template cannot render tool messages"):
        tokenize_conversation(tokenizer, {"messages": messages}, 2048, end_of_turn_text(tokenizer))


def test_a_real_sentencepiece_vocabulary_merges_the_leading_space_into_the_trained_word(tiny_mistral):
    tokenizer, _, _, example = labelled(tiny_mistral)
    assert len(tokenizer) == 32000  # Mistral-7B-v0.1's own tokenizer.model
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first_trained]) == "▁Then"
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first_trained - 1]) == "]"  # ... [/INST] is the prompt


def test_a_conversation_the_template_refuses_is_skipped_with_the_reason(tiny_mistral):
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    with pytest.raises(SkipExample,
                       match=r"the chat template refuses this conversation \(System role not supported\): "
                             "change the conversation to what the template accepts, or train a base model"):
        tokenize_conversation(tokenizer, CONVERSATION, 2048, "</s>")


def test_an_examples_first_token_is_never_counted_as_trained():
    # collate never trains position 0 (nothing before it predicts it), so an example whose only
    # labelled token is its first has nothing to train (and is skipped rather than crash a step).
    assert Example(input_ids=[5, 6, 7], labels=[5, IGNORE, IGNORE]).num_trained == 0
    assert Example(input_ids=[5, 6, 7], labels=[5, IGNORE, 7]).num_trained == 1


def chat_of(messages: int, words: int = 6) -> dict:
    turns = []
    for i in range(messages // 2):
        turns += [{"role": "user", "content": f"question {i} " + "word " * words},
                  {"role": "assistant", "content": f"answer {i} " + "word " * words, "weight": 1}]
    return {"messages": [{"role": "system", "content": "Be brief."}] + turns}


def test_shortening_a_long_conversation_costs_in_proportion_to_its_length(tiny_qwen2):
    """Dropping one turn and labelling again (each labelling rendering every prefix) was cubic: 800 messages took
    270 s where 100 took 0.03 s. Now labelling 800 costs at most 20x labelling 100."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = prepare_chat_template(tokenizer).end_of_turn
    tokenize_conversation(tokenizer, chat_of(10), 2048, eot)  # warm-up
    short = min(seconds(tokenize_conversation, tokenizer, chat_of(100), 2048, eot) for _ in range(3))
    long_example = tokenize_conversation(tokenizer, chat_of(800), 2048, eot)
    long = min(seconds(tokenize_conversation, tokenizer, chat_of(800), 2048, eot) for _ in range(3))
    assert long <= 20 * short, (long, short)
    assert long_example.dropped_messages > 0 and len(long_example.input_ids) <= 2048 and not long_example.truncated


LABELLING_COST = r"""
import json, resource, sys, time
from transformers import AutoTokenizer
from chat_labels import tokenize_conversation
from chat_templates import SkipExample, prepare_chat_template

model, max_seq_length, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(model)
eot = prepare_chat_template(tokenizer).end_of_turn
tokenize_conversation(tokenizer, {"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]},
                      max_seq_length, eot)  # warm-up
messages = {
    "fits": [{"role": "user", "content": "word " * (max_seq_length // 5)},
             {"role": "assistant", "content": "word " * (max_seq_length // 5)}],
    # 8 messages at the per-message cap there was (128 characters a token of max_seq_length): a 2 MB line at 2048
    "8 messages of 128 characters a token": [
        {"role": ("user", "assistant")[i % 2], "content": "wordy " * (max_seq_length * 128 // 6)} for i in range(8)],
    "a 10 MB answer of emoji": [{"role": "user", "content": "Summarise this."},
                                {"role": "assistant", "content": "\U0001F600" * 2_500_000}],
}[case]
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    example = tokenize_conversation(tokenizer, {"messages": messages}, max_seq_length, eot)
    outcome = f"{len(example.input_ids)} tokens, {example.dropped_messages} messages dropped"
except SkipExample as exc:
    outcome = f"skipped: {exc}"
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome,
                  "mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def labelling_cost(model, max_seq_length: int, case: str) -> dict:
    """Seconds and growth of peak memory (MB, the process's high-water mark: so each case in a fresh process) of
    labelling one conversation, and what became of it."""
    done = subprocess.run([sys.executable, "-c", LABELLING_COST, str(model), str(max_seq_length), case], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("case, max_seq_length", [("8 messages of 128 characters a token", 2048),
                                                  ("a 10 MB answer of emoji", 32768)])
def test_a_conversation_far_beyond_max_seq_length_costs_what_a_fitting_one_does(tiny_qwen2, case, max_seq_length):
    """The cap was per message: 8 messages at it took 5.0 s and +380 MB here at 2048 tokens (the review's figures at
    8192: 33 s and +2.4 GB; a 64 MB line ~18 GB), and a 10 MB answer of emoji 24 s and +2.5 GB at 32768, in every
    labelling process at once. Now a conversation's text is bounded as a whole before it is rendered."""
    fits = labelling_cost(tiny_qwen2, max_seq_length, "fits")
    beyond = labelling_cost(tiny_qwen2, max_seq_length, case)
    assert beyond["seconds"] < 2 * fits["seconds"] + 1.0 and beyond["mb"] < 2 * fits["mb"] + 100, (fits, beyond)
    assert fits["outcome"].endswith(" tokens, 0 messages dropped")
    # its last turn alone is beyond what max_seq_length can hold: skipped, saying so, rather than train a cut answer
    assert beyond["outcome"].startswith("skipped: ") and f"max_seq_length={max_seq_length}" in beyond["outcome"]
    assert "a trained answer is never cut" in beyond["outcome"]


def test_labelled_examples_hold_a_few_bytes_a_token(tiny_qwen2):
    """Every labelled example stays in memory for the whole run; as lists of Python ints they took about 42 bytes a
    token (20 GB for 250k examples of 1,000 tokens). Now two 4-byte integers a token, and a little per example."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    eot = prepare_chat_template(tokenizer).end_of_turn
    conversations = [chat_of(40, words=8 + i % 5) for i in range(200)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        examples = [tokenize_conversation(tokenizer, c, 2048, eot) for c in conversations]
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    tokens = sum(len(e.input_ids) for e in examples)
    assert tokens > 100_000 and held / tokens < 12, (held / tokens, tokens)
