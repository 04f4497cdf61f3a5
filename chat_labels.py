"""Conversations → token ids and labels that train exactly the assistant's words and end-of-turn.

The trained tokens of a conversation are its assistant messages with weight ≠ 0 plus the token(s)
that close each of those turns (so the model learns to stop); nothing else. Spans are found in the
rendered text, not through `{% generation %}` markers (most real templates, Qwen2.5 and Mistral
among them, have none): each assistant message's content is located in the full rendering, starting
where the rendering of the conversation before it ends, and extended over the template's end-of-turn
text. Character spans map to tokens through the tokenizer's offsets, so a SentencePiece token that
merges a leading space with the first word is trained.

A base model without a chat template gets a default chosen from tokens its vocabulary already has
(ChatML when `<|im_start|>`/`<|im_end|>` exist, else Mistral's `[INST]` format closed by EOS); no
special token is ever added (QLoRA does not train the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral-Instruct's format: <s>[INST] system\n\nuser [/INST] assistant</s>[INST] user [/INST] ...
INST_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('this template renders only system, user and assistant messages') }}"
    "{% endif %}{% endfor %}"
)


class SkipExample(Exception):
    """This conversation cannot be trained on; the message says why."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    dropped_messages: int = 0
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_trained(self) -> int:
        """Tokens the loss trains; an example's first token never is (nothing before it predicts it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def ensure_chat_template(tokenizer) -> str:
    """Give `tokenizer` a chat template if it has none; return where the template came from."""
    if tokenizer.chat_template:
        return "tokenizer"
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        tokenizer.chat_template = CHATML_TEMPLATE
        return "default-chatml"
    if tokenizer.eos_token is None:
        raise SkipExample("the base model's tokenizer has no chat template and no EOS token to end turns with")
    tokenizer.chat_template = INST_TEMPLATE
    return "default-inst"


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
    """The chat template's text; a conversation the template refuses (raise_exception) is skipped."""
    from jinja2 import TemplateError

    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise SkipExample(f"the chat template refuses this conversation: {exc}") from None


def end_of_turn_text(tokenizer) -> str:
    """The text the template writes right after an assistant message's content (e.g. `<|im_end|>`, `</s>`)."""
    sentinel = "SENTINEL_7f3a"
    text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}])
    tail = text[text.rindex(sentinel) + len(sentinel):].rstrip()
    if not tail:
        raise SkipExample("the chat template writes nothing after an assistant message, so the model could not learn to stop")
    return tail


def end_of_turn_token(tokenizer, eot_text: str) -> str:
    """The single token that ends an assistant turn (the last token of the end-of-turn text)."""
    ids = tokenizer(eot_text, add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[-1])


def supports_tools(tokenizer) -> bool:
    return "tool" in (tokenizer.chat_template or "")


def trained_char_spans(tokenizer, messages: list[dict], tools: list | None, full: str, eot_text: str) -> list[tuple[int, int]]:
    """Character spans of `full` (the whole rendering) to train: each trained assistant content + end-of-turn."""
    spans, cursor = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:k], tools, add_generation_prompt=True) if k else ""
        start = len(before) if before and full.startswith(before) else cursor
        if message.get("tool_calls"):
            # A tool call is rendered by the template in its own syntax: its span is what rendering
            # this message adds to the conversation before it (which must render as a prefix).
            after = render(tokenizer, messages[:k + 1], tools).rstrip()
            if not (before and full.startswith(before) and full.startswith(after) and after.endswith(eot_text)):
                raise SkipExample(f"the chat template renders the tool call of assistant message {k} differently in context")
            spans.append((len(before), len(after)))
            cursor = len(after)
            continue
        content = (message.get("content") or "").strip()
        if not content:
            continue
        a = full.find(content, max(start, cursor))
        if a < 0:
            raise SkipExample(f"the chat template does not render assistant message {k} verbatim")
        b = a + len(content)
        gap = full.find(eot_text, b)
        if gap < 0 or full[b:gap].strip():
            raise SkipExample(f"the chat template does not end assistant message {k} with {eot_text!r}")
        b = gap + len(eot_text)
        spans.append((a, b))
        cursor = b
    return spans


def _labelled(tokenizer, messages: list[dict], tools: list | None, eot_text: str) -> tuple[list[int], list[int]]:
    full = render(tokenizer, messages, tools)
    spans = trained_char_spans(tokenizer, messages, tools, full, eot_text)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = encoded["input_ids"], []
    for token, (s, e) in zip(ids, encoded["offset_mapping"]):
        trained = any(s < b and e > a for a, b in spans)
        labels.append(token if trained else IGNORE)
    return ids, labels


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """Remove the oldest user turn (and the replies up to the next user message), keeping the system
    message and at least one trained assistant message. None when nothing more can be dropped."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    next_user = next((i for i, m in enumerate(body) if i > 0 and m["role"] == "user"), None)
    if next_user is None:
        return None
    rest = body[next_user:]
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in rest):
        return None
    return head + rest


def tokenize_conversation(tokenizer, conversation: dict, max_seq_length: int, eot_text: str) -> Example:
    """Token ids and labels for one canonical conversation, shortened to fit `max_seq_length`.

    Too long: the oldest history turns go first (system message and trained target kept); if the
    rest still does not fit, the sequence is cut at its end. Raises SkipExample when nothing is left
    to train or the template cannot render the conversation.
    """
    messages, tools = conversation["messages"], conversation.get("tools")
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not supports_tools(tokenizer):
        raise SkipExample("the conversation uses tools but the chat template cannot render tool messages")
    original = len(messages)
    ids, labels = _labelled(tokenizer, messages, tools, eot_text)
    while len(ids) > max_seq_length:
        shorter = _drop_oldest_turn(messages)
        if shorter is None:
            break
        messages = shorter
        ids, labels = _labelled(tokenizer, messages, tools, eot_text)
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    example = Example(ids, labels, dropped_messages=original - len(messages), truncated=truncated)
    if example.num_trained == 0:
        raise SkipExample("no trained token is left after fitting the conversation into max_seq_length")
    return example


def trained_runs(tokenizer, example: Example) -> list[str]:
    """The maximal runs of consecutive trained tokens, each decoded with special tokens kept."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def pack_examples(examples: list[Example], max_seq_length: int) -> list[list[Example]]:
    """First-fit decreasing: group examples into sequences of at most `max_seq_length` tokens."""
    bins: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                bins[i].append(example)
                room[i] -= n
                break
        else:
            bins.append([example])
            room.append(max_seq_length - n)
    return bins


def collate(sequences: list[list[Example]], pad_token_id: int, device: str = "cpu"):
    """Tensors for one micro-batch of (packed) sequences.

    Returns input_ids and labels (B, L), position_ids restarting at 0 for each example, and an
    attention mask: when a row holds several examples, a boolean 4D mask (B, 1, L, L) that is causal
    within each example and blocks attention across examples (position_ids alone do not isolate
    packed examples under sdpa or eager); with one example per row, the plain (B, L) padding mask.
    Padding is never trained. The (B, L) tensors are filled on the CPU and moved to `device`; the
    L x L mask is built there (on a GPU: no 8 x 2048 x 2048 mask crossing the bus every step).

    For the loss: `loss_index`, the flat (B x L) positions whose next token is trained, and
    `loss_targets`, those tokens; found here on the CPU, so that selecting them on the GPU is an
    index_select (a boolean mask there would make the CPU wait for the GPU to count it).
    """
    import torch

    length = max(sum(len(e.input_ids) for e in seq) for seq in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segment = torch.full((batch, length), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        offset = 0
        for index, example in enumerate(seq):
            n = len(example.input_ids)
            input_ids[row, offset:offset + n] = torch.tensor(example.input_ids)
            example_labels = torch.tensor(example.labels)
            example_labels[0] = IGNORE  # never predict an example's first token from the previous one
            labels[row, offset:offset + n] = example_labels
            position_ids[row, offset:offset + n] = torch.arange(n)
            segment[row, offset:offset + n] = index
            offset += n
    # counted on the CPU: reading a count back from the GPU would stall the queue of its kernels
    trained = labels[:, 1:] != IGNORE
    rows, columns = trained.nonzero(as_tuple=True)
    loss_index, loss_targets = rows * length + columns, labels[:, 1:][trained]
    real_tokens, trained_tokens = int((segment >= 0).sum()), len(loss_targets)
    # non_blocking: the copies are queued, not waited for (from pageable memory the data is staged first,
    # so these CPU tensors may be dropped at once)
    input_ids, labels, position_ids, segment, loss_index, loss_targets = (
        t.to(device, non_blocking=True) for t in (input_ids, labels, position_ids, segment, loss_index, loss_targets))
    real = segment >= 0
    if all(len(seq) == 1 for seq in sequences):
        # One example per row: a plain padding mask lets attention use its fast causal kernels.
        mask = real.long()
    else:
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
        same = segment[:, :, None] == segment[:, None, :]
        mask = same & causal & real[:, :, None]
        mask |= torch.eye(length, dtype=torch.bool, device=device)  # padding rows attend to themselves
        mask = mask[:, None]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask, "loss_index": loss_index, "loss_targets": loss_targets,
            "real_tokens": real_tokens, "trained_tokens": trained_tokens,
            "computed_tokens": batch * length}
