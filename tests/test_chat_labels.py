"""Labels: exactly the assistant's words plus the end-of-turn token, for a ChatML and a template-less
SentencePiece-style base model; packing that isolates examples."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_labels import IGNORE, Example, collate, pack_examples, tokenize_conversation, trained_runs
from chat_templates import end_of_turn_text, ensure_chat_template

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
    conversation = {"messages": [dict(m, weight=1) if m["role"] == "assistant" else m for m in CONVERSATION["messages"]]}
    tokenizer, _, _, example = labelled(tiny_qwen2, conversation)
    assert trained_runs(tokenizer, example) == ["It depends on your rate and your savings.<|im_end|>",
                                                "Then paying it down early is a safe return.<|im_end|>"]
    trained_text = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE])
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
    import chat_labels

    rendered = []
    render = chat_labels.render
    monkeypatch.setattr(chat_labels, "render", lambda *args, **kwargs: rendered.append(render(*args, **kwargs)) or rendered[-1])
    long_turn = [{"role": "user", "content": "context " * 2000}, {"role": "assistant", "content": "Noted.", "weight": 1}]
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
    assert batch["trained_tokens"] == example.num_trained + short.num_trained == int((batch["labels"][:, 1:] != IGNORE).sum())
    # The loss's positions, found on the CPU: each predicts the token after it, and that token is trained.
    for b in (batch, collate([[example, short], [short]], tokenizer.pad_token_id)):
        assert len(b["loss_targets"]) == b["trained_tokens"]
        assert torch.equal(b["input_ids"].flatten()[b["loss_index"] + 1], b["loss_targets"])
        assert torch.equal(b["loss_targets"], b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE])


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments }})</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_conversation():
    import json

    from conftest import ROOT
    return json.loads((ROOT / "tests" / "fixtures" / "openai_tools.jsonl").read_text().splitlines()[0])


def test_tool_calls_are_trained_and_tool_results_are_not(tiny_qwen2):
    from dataset_loader import finalize, normalize_openai

    record = tool_conversation()
    messages, _ = finalize(normalize_openai(record))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    tokenizer.chat_template = TOOL_TEMPLATE
    eot = end_of_turn_text(tokenizer)
    example = tokenize_conversation(tokenizer, {"messages": messages, "tools": record["tools"]}, 2048, eot)
    assert trained_runs(tokenizer, example) == ["<tool_call>get_rate({})</tool_call><|im_end|>",
                                                "Today's 30-year rate is 6.1%.<|im_end|>"]


def test_tools_with_a_template_that_cannot_render_them_are_skipped_with_the_reason(tiny_qwen2):
    from chat_templates import SkipExample
    from dataset_loader import finalize, normalize_openai

    messages, _ = finalize(normalize_openai(tool_conversation()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    with pytest.raises(SkipExample, match="uses tools but the chat template cannot render tool messages"):
        tokenize_conversation(tokenizer, {"messages": messages}, 2048, end_of_turn_text(tokenizer))


def test_a_real_sentencepiece_vocabulary_merges_the_leading_space_into_the_trained_word(tiny_mistral):
    tokenizer, _, _, example = labelled(tiny_mistral)
    assert len(tokenizer) == 32000  # Mistral-7B-v0.1's own tokenizer.model
    first_trained = next(i for i, l in enumerate(example.labels) if l != IGNORE)
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first_trained]) == "▁Then"
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first_trained - 1]) == "]"  # ... [/INST] is the prompt


def test_a_conversation_the_template_refuses_is_skipped_with_the_reason(tiny_mistral):
    from chat_templates import SkipExample

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(SkipExample, match=r"the chat template refuses this conversation \(System role not supported\): "
                                          "change the conversation to what the template accepts, or train a base model"):
        tokenize_conversation(tokenizer, CONVERSATION, 2048, "</s>")


def test_an_examples_first_token_is_never_counted_as_trained():
    # collate never trains position 0 (nothing before it predicts it), so an example whose only
    # labelled token is its first has nothing to train (and is skipped rather than crash a step).
    assert Example(input_ids=[5, 6, 7], labels=[5, IGNORE, IGNORE]).num_trained == 0
    assert Example(input_ids=[5, 6, 7], labels=[5, IGNORE, 7]).num_trained == 1

