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
        raise SkipExample(f"the chat template refuses this conversation ({exc}): change the conversation to what the "
                          "template accepts, or train a base model whose template accepts it") from None


def end_of_turn_text(tokenizer) -> str:
    """The text that closes every assistant turn (e.g. `<|im_end|>`, `</s>`, `<|end|>`): what the template
    writes after an assistant message both in the middle of a conversation and at its end. Their common
    start is the turn's own closer; what follows only one of them belongs to something else: the next
    turn's header, or an end-of-text some templates add after the last turn (Phi-3.5's `<|endoftext|>`)."""
    a1, u2, a2 = "SENTINEL_A1_7f3a", "SENTINEL_U2_7f3a", "SENTINEL_A2_7f3a"
    single = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a2}])
    tail = single[single.rindex(a2) + len(a2):]
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1},
                                  {"role": "user", "content": u2}, {"role": "assistant", "content": a2}])
        between, last = text[text.index(a1) + len(a1):text.index(u2)], text[text.rindex(a2) + len(a2):]
    except (SkipExample, ValueError):  # a template for single-turn chats only
        return _non_empty(tail.rstrip())
    # the common start in whole tokens: "<|end|>\n<|user|>" and "<|end|>\n<|endoftext|>" share "<|end|>\n"
    return _non_empty(between[:_shared_start(tokenizer, between, last)].rstrip())


def _shared_start(tokenizer, a: str, b: str) -> int:
    """How many characters of `a` its common start with `b` covers, in whole tokens."""
    encoded = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    other = tokenizer(b, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(encoded["input_ids"]), len(other)) and encoded["input_ids"][shared] == other[shared]:
        shared += 1
    return encoded["offset_mapping"][shared - 1][1] if shared else 0


def _non_empty(closer: str) -> str:
    if not closer:
        raise SkipExample("the chat template writes nothing after an assistant message, so the model could not learn to stop")
    return closer


# Where a system prompt goes when the template itself drops or refuses it in a training conversation (one
# that ends with the assistant's answer). A prelude run before the template moves it there, in training
# and, saved with the adapter, at inference alike: merged into a user turn, "<system>\n\n<user>", as
# Mistral's and Gemma's own formats do.
_MERGE = "{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[%s]['content']}"
SYSTEM_PRELUDES = {
    # Gemma's documentation puts instructions in the first user turn (Gemma-2 refuses a system role).
    "first user turn": (
        "{%- if messages and messages[0]['role'] == 'system' and messages|length > 1 and messages[1]['role'] == 'user'"
        " and messages[0]['content'] is string and messages[1]['content'] is string -%}"
        "{%- set messages = [" + _MERGE % "1" + "] + messages[2:] -%}"
        "{%- endif -%}"),
    # Mistral-Instruct's template puts it in the last user turn, but only when that turn ends the conversation.
    "last user turn": (
        "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] is string -%}"
        "{%- set ns_sys = namespace(last=0) -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' and m['content'] is string -%}"
        "{%- set ns_sys.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- if ns_sys.last > 0 -%}"
        "{%- set messages = messages[1:ns_sys.last] + [" + _MERGE % "ns_sys.last" + "] + messages[ns_sys.last + 1:] -%}"
        "{%- endif -%}{%- endif -%}"),
}


def system_prompt_placement(tokenizer) -> str:
    """Where the template puts a system prompt in a training conversation: "template" when it renders the
    text itself; else where the model's format puts it at inference: "last user turn" when the template
    attaches it to the final user message (Mistral-Instruct v0.3), "first user turn" when it refuses or
    drops it everywhere (Gemma-2)."""
    system, u1, a1, u2 = "SENTINEL_SYS_7f3a", "SENTINEL_U1_7f3a", "SENTINEL_A1_7f3a", "SENTINEL_U2_7f3a"
    head = [{"role": "system", "content": system}, {"role": "user", "content": u1}, {"role": "assistant", "content": a1}]
    try:
        if system in render(tokenizer, head):
            return "template"
        asked = render(tokenizer, head + [{"role": "user", "content": u2}], add_generation_prompt=True)
    except SkipExample:  # refuses a system role
        return "first user turn"
    if system in asked and asked.index(system) > asked.index(a1):
        return "last user turn"
    return "first user turn"


@dataclass(frozen=True)
class ChatFormat:
    """How a base model's conversations are rendered for training (and, saved with the adapter, at inference)."""

    source: str  # where the template came from: "tokenizer", "default-chatml", "default-inst"
    end_of_turn: str  # what closes every assistant turn; trained after each answer
    system_prompt: str  # "template", or the user turn the prelude merges it into
    non_thinking: bool = False  # a hybrid reasoning template, rendered (and saved) in its non-thinking mode

    def describe(self) -> dict:
        how = ("rendered by the template" if self.system_prompt == "template" else
               f"merged into the {self.system_prompt} ('<system>\\n\\n<user>'): the template drops or refuses a "
               "system role; the saved template does the same at inference")
        described = {"template_source": self.source, "end_of_turn": self.end_of_turn, "system_prompt": how}
        if self.non_thinking:
            described["reasoning"] = ("non-thinking mode (enable_thinking false): the answers carry no reasoning; "
                                      "the saved template defaults to it")
        return described


# Hybrid reasoning templates (Qwen3, SmolLM3) switch modes with `enable_thinking`, on by default. The answers
# trained here carry no reasoning: they are rendered in the non-thinking mode (Qwen3: an empty think block before
# the answer; SmolLM3: "/no_think"), and the template saved with the adapter defaults to it, so that a plain
# apply_chat_template at inference prompts the model as it was trained.
NON_THINKING_PRELUDE = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}"


def prepare_chat_template(tokenizer) -> ChatFormat:
    """Give `tokenizer` the chat template training and inference use (its own, or a default from tokens it
    has; with a prelude where the template would lose the system prompt or assume reasoning), and describe it."""
    source = ensure_chat_template(tokenizer)
    template = tokenizer.chat_template
    non_thinking = isinstance(template, str) and "enable_thinking" in template
    if non_thinking:
        tokenizer.chat_template = template = NON_THINKING_PRELUDE + template
    placement = system_prompt_placement(tokenizer)
    if placement != "template" and isinstance(template, str):
        tokenizer.chat_template = SYSTEM_PRELUDES[placement] + template
    return ChatFormat(source, end_of_turn_text(tokenizer), placement, non_thinking)


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
            # A tool call is rendered in the template's own syntax: its span runs from the end of the assistant's
            # header (the part of the generation prompt the conversation's rendering shares) to the turn's end.
            prompt = render(tokenizer, messages[:k], tools)
            if not full.startswith(prompt):
                raise SkipExample(f"the chat template renders the conversation before assistant message {k} differently "
                                  "once the message follows, so its tool call has no place to train from: remove the tool "
                                  "calls, or train a base model whose template renders them in order")
            start = len(prompt) + _shared_start(tokenizer, before[len(prompt):] if before.startswith(prompt) else "",
                                                full[len(prompt):])
            end = full.find(eot_text, start)
            called = full[start:end if end >= 0 else len(full)]
            if end < 0 or not all(str(c["function"]["name"]) in called for c in message["tool_calls"]):
                raise SkipExample(f"the chat template does not render the tool calls of assistant message {k} (it drops "
                                  "them or does not end them with its end of turn): remove them, or train a base model "
                                  "whose template renders tool calls")
            spans.append((start, end + len(eot_text)))
            cursor = end + len(eot_text)
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


def segment_spans(lengths_per_row: list[list[int]], length: int) -> tuple:
    """Per row of a micro-batch, the (start, end) spans of its examples in order, and its padding as one more
    span: what layers that cannot take the attention mask need to run each example on its own."""
    rows = []
    for lengths in lengths_per_row:
        spans, start = [], 0
        for n in lengths:
            spans.append((start, start + n))
            start += n
        if start < length:
            spans.append((start, length))
        rows.append(tuple(spans))
    return tuple(rows)


def collate(sequences: list[list[Example]], pad_token_id: int, device: str = "cpu", attention: str = "sdpa",
            pad_to: int | None = None):
    """Tensors for one micro-batch of (packed) sequences, `pad_to` tokens long when given.

    Returns input_ids and labels (B, L), position_ids restarting at 0 for each example, and an
    attention mask: when a row holds several examples, a mask that is causal within each example and
    blocks attention across examples (position_ids alone do not isolate packed examples under sdpa or
    eager): for `attention="flex_attention"` a BlockMask (a document mask: flex attention skips the
    blocks it rules out), else a boolean 4D mask (B, 1, L, L); with one example per row, the plain (B, L)
    padding mask.
    Padding is never trained. The (B, L) tensors are filled on the CPU and moved to `device`; the
    L x L mask is built there (on a GPU: no 8 x 2048 x 2048 mask crossing the bus every step).

    `segments` (plain ints, on the CPU): each row's example spans, for linear-attention layers that the mask
    does not reach (base_models.isolate_packed_examples).

    For the loss: `loss_index`, the flat (B x L) positions whose next token is trained, and
    `loss_targets`, those tokens; found here on the CPU, so that selecting them on the GPU is an
    index_select (a boolean mask there would make the CPU wait for the GPU to count it).
    """
    import torch

    length = max(pad_to or 0, max(sum(len(e.input_ids) for e in seq) for seq in sequences))
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
    segments = segment_spans([[len(e.input_ids) for e in seq] for seq in sequences], length)
    real = segment >= 0
    if all(len(seq) == 1 for seq in sequences):
        # One example per row: a plain padding mask lets attention use its fast causal kernels.
        mask = real.long()
    elif attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_example_causal(b, h, q, kv):  # padding attends to padding: never trained
            return (segment[b, q] == segment[b, kv]) & (q >= kv)

        mask = create_block_mask(same_example_causal, batch, None, length, length, device=device)
    else:
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
        same = segment[:, :, None] == segment[:, None, :]
        mask = same & causal & real[:, :, None]
        mask |= torch.eye(length, dtype=torch.bool, device=device)  # padding rows attend to themselves
        mask = mask[:, None]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask, "segments": segments, "loss_index": loss_index, "loss_targets": loss_targets,
            "real_tokens": real_tokens, "trained_tokens": trained_tokens,
            "computed_tokens": batch * length}
