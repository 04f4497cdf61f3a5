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

import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from array import array
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from job import Hyperparameters

log = logging.getLogger(__name__)

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
    """One tokenized conversation. Its ids and labels are stored as 32-bit integer arrays (4 bytes a token; a list of
    Python ints took about 42 bytes a token, 20 GB for a 250k-example dataset at 1,000 tokens each)."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    dropped_messages: int = 0
    truncated: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.input_ids, self.labels = array("i", self.input_ids), array("i", self.labels)

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
    non_thinking = "enable_thinking" in str(tokenizer.chat_template)
    if non_thinking:
        _prepend(tokenizer, NON_THINKING_PRELUDE)
    placement = system_prompt_placement(tokenizer)
    if placement != "template":
        _prepend(tokenizer, SYSTEM_PRELUDES[placement])
    return ChatFormat(source, end_of_turn_text(tokenizer), placement, non_thinking)


def _prepend(tokenizer, prelude: str) -> None:
    """Put `prelude` before the chat template (each of them, for a tokenizer with named templates)."""
    template = tokenizer.chat_template
    tokenizer.chat_template = ({name: prelude + t for name, t in template.items()} if isinstance(template, dict)
                               else prelude + template)


def end_of_turn_token(tokenizer, eot_text: str) -> str:
    """The single token that ends an assistant turn (the last token of the end-of-turn text)."""
    ids = tokenizer(eot_text, add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[-1])


def supports_tools(tokenizer) -> bool:
    return "tool" in (tokenizer.chat_template or "")


# Answers are found in the rendering exactly: the conversation is rendered once with each trained answer replaced by
# a placeholder (private-use characters no template writes), so where each answer sits is known, whatever else in
# the conversation repeats its words; the real rendering must then be the placeholder rendering with the answers put
# back (a template that rewrites an answer as it renders it is named, not guessed at).
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDERS = re.compile("\ue000(\\d+)\ue001")


def trained_char_spans(tokenizer, messages: list[dict], tools: list | None, eot_text: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's rendering, and its character spans to train: each trained answer and the end of its turn,
    each trained tool call from the end of the assistant's header to the end of its turn. Two renderings, plus one
    of the conversation before each trained tool call."""
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)
               and not m.get("tool_calls") and (m.get("content") or "").strip()]
    if any("\ue000" in str(m.get("content") or "") for m in messages):
        raise SkipExample("the conversation contains the private-use character U+E000, which the worker uses to mark "
                          "answers: remove it")
    texts = {k: messages[k]["content"].strip() for k in answers}
    marked = render(tokenizer, [dict(m, content=_PLACEHOLDER.format(k)) if k in texts else m
                                for k, m in enumerate(messages)], tools)
    pieces, spans, position = [], {}, 0
    for match in _PLACEHOLDERS.finditer(marked):
        k = int(match.group(1))
        pieces.append(marked[position:match.start()])
        start = sum(map(len, pieces))
        if k in spans or k not in texts:
            raise SkipExample(f"the chat template writes assistant message {k} more than once")
        pieces.append(texts[k])
        spans[k] = (start, start + len(texts[k]))
        position = match.end()
    full = "".join(pieces) + marked[position:]
    missing = [k for k in texts if k not in spans]
    if missing or full != render(tokenizer, [dict(m, content=texts[k]) if k in texts else m for k, m in enumerate(messages)], tools):
        k = missing[0] if missing else next(iter(texts))
        raise SkipExample(f"the chat template rewrites assistant message {k} as it renders it (e.g. a <think> part moved "
                          "out of its text), so its tokens cannot be told from the template's: remove that part of the "
                          "answer, or train a base model whose template renders answers as written")
    result = []
    for k, (a, b) in sorted(spans.items()):
        gap = full.find(eot_text, b)
        if gap < 0 or full[b:gap].strip():
            raise SkipExample(f"the chat template does not end assistant message {k} with {eot_text!r}")
        result.append((a, gap + len(eot_text)))
    for k, message in enumerate(messages):
        if message["role"] == "assistant" and message.get("weight", 1) and message.get("tool_calls"):
            result.append(_tool_call_span(tokenizer, messages, tools, k, full, eot_text))
    return full, sorted(result)


def _tool_call_span(tokenizer, messages, tools, k: int, full: str, eot_text: str) -> tuple[int, int]:
    """A tool call is rendered in the template's own syntax: its span runs from the end of the assistant's header
    (the part of the generation prompt the conversation's rendering shares) to the end of the turn."""
    prompt = render(tokenizer, messages[:k], tools)
    if not full.startswith(prompt):
        raise SkipExample(f"the chat template renders the conversation before assistant message {k} differently once "
                          "the message follows, so its tool call has no place to train from: remove the tool calls, or "
                          "train a base model whose template renders them in order")
    before = render(tokenizer, messages[:k], tools, add_generation_prompt=True)
    start = len(prompt) + _shared_start(tokenizer, before[len(prompt):] if before.startswith(prompt) else "",
                                        full[len(prompt):])
    end = full.find(eot_text, start)
    called = full[start:end if end >= 0 else len(full)]
    if end < 0 or not all(str(c["function"]["name"]) in called for c in messages[k]["tool_calls"]):
        raise SkipExample(f"the chat template does not render the tool calls of assistant message {k} (it drops them or "
                          "does not end them with its end of turn): remove them, or train a base model whose template "
                          "renders tool calls")
    return start, end + len(eot_text)


def _labelled(tokenizer, messages: list[dict], tools: list | None, eot_text: str) -> tuple[list[int], list[int]]:
    full, spans = trained_char_spans(tokenizer, messages, tools, eot_text)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, spans = encoded["input_ids"], [], iter(spans)
    span = next(spans, None)
    for token, (s, e) in zip(ids, encoded["offset_mapping"]):  # tokens and spans both in order: one pass
        while span is not None and s >= span[1]:
            span = next(spans, None)
        labels.append(token if span is not None and s < span[1] and e > span[0] else IGNORE)
    return ids, labels


# A conversation's text is held to MAX_BYTES_PER_TOKEN x max_seq_length bytes of UTF-8 before it is rendered: a token
# covers a byte at least (byte-level BPE, SentencePiece's byte fallback), so this bounds what the tokenizer makes of it,
# whatever the script. Whole texts average far fewer (measured on the Qwen2.5, Llama-3, DeepSeek-V3 and GLM-4
# vocabularies): prose about 4.5 bytes a token, Python 4, JSON indented by 8 spaces 11, markdown table rules 12.6; only
# long runs of one character go beyond (128 spaces make one token). So a conversation over the budget could not fit,
# short of being mostly such runs, and the tokenizer makes at most 32x max_seq_length tokens of any conversation.
MAX_BYTES_PER_TOKEN = 32


def _utf8_size(text: str, limit: int) -> int:
    """len(text.encode()); a text of more than `limit` characters, over it in any case, is not encoded."""
    return len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))


def _message_size(message: dict, limit: int) -> int:
    calls = json.dumps(message["tool_calls"], ensure_ascii=False) if message.get("tool_calls") else ""
    return _utf8_size(message.get("content") or "", limit) + _utf8_size(calls, limit)


def _within_budget(messages: list[dict], tools: list | None, max_seq_length: int) -> list[dict]:
    """`messages` without the oldest turns that could never fit: the system prompt and the newest whole turns (each from
    a user message) within max_seq_length messages (each takes a token at least) and MAX_BYTES_PER_TOKEN x
    max_seq_length bytes of text, the tools' included. Raises SkipExample when that leaves no trained answer: the answer
    would have to be cut, and a cut answer is never trained. Nothing is rendered or tokenized here."""
    budget = max_seq_length * MAX_BYTES_PER_TOKEN
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    room = budget - sum(_message_size(m, budget) for m in head)
    room -= _utf8_size(json.dumps(tools, ensure_ascii=False), budget) if tools else 0
    start = len(body)  # the oldest message kept
    while start > 0 and len(body) - start < max_seq_length:
        size = _message_size(body[start - 1], budget)
        if size > room:
            break
        room, start = room - size, start - 1
    if start > 0:  # what is kept starts with a turn's user message
        start = next((i for i in range(start, len(body)) if body[i]["role"] == "user"), len(body))
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in body[start:]):
        raise SkipExample(f"the conversation cannot fit max_seq_length={max_seq_length} even with its oldest turns removed: "
                          f"its last turn with a trained answer, with the system prompt and tools, holds more than "
                          f"{budget:,} bytes of text ({MAX_BYTES_PER_TOKEN} a token) or {max_seq_length} messages, and a "
                          "trained answer is never cut: shorten its messages, or raise max_seq_length")
    return head + body[start:]


def tokenize_conversation(tokenizer, conversation: dict, max_seq_length: int, eot_text: str) -> Example:
    """Token ids and labels for one canonical conversation, shortened to fit `max_seq_length`.

    Too long: the oldest history turns go first (system message and a trained answer kept): those beyond the text
    budget unrendered (_within_budget), then as many as must go, found by bisection over the turns, a few labellings
    whatever the conversation's length. If the rest still does not fit, the sequence is cut at its end. Raises
    SkipExample when nothing is left to train or the template cannot render the conversation.
    """
    tools = conversation.get("tools")
    messages = _within_budget(conversation["messages"], tools, max_seq_length)
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not supports_tools(tokenizer):
        raise SkipExample("the conversation uses tools but the chat template cannot render tool messages")
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    # where a turn may be dropped up to: each later user message, while a trained answer remains after it
    trained_after = [i for i, m in enumerate(body) if m["role"] == "assistant" and m.get("weight", 1)]
    starts = [0] + [i for i, m in enumerate(body) if i > 0 and m["role"] == "user" and trained_after
                    and trained_after[-1] > i]

    def labelled(t: int):
        return _labelled(tokenizer, head + body[starts[t]:], tools, eot_text)

    t, (ids, labels) = 0, labelled(0)
    if len(ids) > max_seq_length and len(starts) > 1:
        low, high, best = 1, len(starts) - 1, None  # the fewest dropped turns that fit; else the most
        while low <= high:
            middle = (low + high) // 2
            attempt = labelled(middle)
            if len(attempt[0]) <= max_seq_length:
                best, high = (middle, attempt), middle - 1
            else:
                low = middle + 1
        t, (ids, labels) = best if best is not None else (len(starts) - 1, labelled(len(starts) - 1))
    truncated = len(ids) > max_seq_length
    ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    dropped = len(conversation["messages"]) - len(head) - (len(body) - starts[t])
    example = Example(ids, labels, dropped_messages=dropped, truncated=truncated)
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


PACKED_CHUNK = 64  # the chunked delta rule pads each call to this many tokens: examples are grouped by it


def per_example_groups(lengths_per_row: list[list[int]], length: int, device: str = "cpu") -> tuple | None:
    """How a micro-batch's packed examples run one at a time in the layers the attention mask does not reach
    (base_models.isolate_packed_examples): the examples (and each row's padding) as the rows of a batch, in groups of
    similar length, each group a (gather, source, destination) triple of token indices into the flat (B x L)
    sequence, with B x L standing for an all-zero padding token. A group pads to at most 1.5x its real tokens
    (lengths rounded up to PACKED_CHUNK). Built here on the CPU and sent ahead: the layers read nothing back.
    None when no row holds more than one example."""
    import torch

    if all(len(lengths) <= 1 for lengths in lengths_per_row):
        return None
    spans = []
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for n in [*lengths, length - sum(lengths)]:
            if n:
                spans.append((b * length + start, n))
                start += n
    spans.sort(key=lambda span: -span[1])  # longest first: a group's first span is its longest

    def padded(n: int) -> int:
        return -(-n // PACKED_CHUNK) * PACKED_CHUNK

    groups, current, real = [], [], 0
    for span in spans:
        if current and (len(current) + 1) * padded(current[0][1]) > 1.5 * (real + padded(span[1])):
            groups.append(current)
            current, real = [], 0
        current.append(span)
        real += padded(span[1])
    groups.append(current)
    built = []
    for group in groups:
        longest = group[0][1]
        gather = torch.full((len(group), longest), len(lengths_per_row) * length, dtype=torch.long)
        for i, (first, n) in enumerate(group):
            gather[i, :n] = torch.arange(first, first + n)
        source = torch.cat([torch.arange(i * longest, i * longest + n) for i, (_, n) in enumerate(group)])
        destination = torch.cat([torch.arange(first, first + n) for first, n in group])
        built.append(tuple(t.to(device, non_blocking=True) for t in (gather, source, destination)))
    return tuple(built)


def collate(sequences: list[list[Example]], pad_token_id: int, device: str = "cpu", attention: str = "sdpa",
            pad_to: int | None = None):
    """Tensors for one micro-batch of (packed) sequences (`pad_to` tokens long when given and a row is packed).

    Returns input_ids and labels (B, L), position_ids restarting at 0 for each example, and an
    attention mask: when a row holds several examples, a mask that is causal within each example and
    blocks attention across examples (position_ids alone do not isolate packed examples under sdpa or
    eager): for `attention="flex_attention"` a BlockMask (a document mask: flex attention skips the
    blocks it rules out), else a boolean 4D mask (B, 1, L, L); with one example per row, the plain (B, L)
    padding mask.
    Padding is never trained. The (B, L) tensors are filled on the CPU and moved to `device`; the
    L x L mask is built there (on a GPU: no 8 x 2048 x 2048 mask crossing the bus every step).

    `per_example`: the index groups that run each packed example on its own in linear-attention layers,
    which the mask does not reach (per_example_groups; None when no row is packed).

    For the loss: `loss_index`, the flat (B x L) positions whose next token is trained, and
    `loss_targets`, those tokens; found here on the CPU, so that selecting them on the GPU is an
    index_select (a boolean mask there would make the CPU wait for the GPU to count it).
    """
    import torch

    length = max(sum(len(e.input_ids) for e in seq) for seq in sequences)
    if pad_to and any(len(seq) > 1 for seq in sequences):  # only rows that get the BlockMask: a fixed shape
        length = max(length, pad_to)
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segment = torch.full((batch, length), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        offset = 0
        for index, example in enumerate(seq):
            n = len(example.input_ids)
            input_ids[row, offset:offset + n] = torch.frombuffer(example.input_ids, dtype=torch.int32)
            example_labels = torch.frombuffer(example.labels, dtype=torch.int32).long()  # a copy: the example stays
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
    per_example = per_example_groups([[len(e.input_ids) for e in seq] for seq in sequences], length, device)
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
            "attention_mask": mask, "per_example": per_example, "loss_index": loss_index, "loss_targets": loss_targets,
            "real_tokens": real_tokens, "trained_tokens": trained_tokens,
            "computed_tokens": batch * length}


# ---------------------------------------------------------------------------- a dataset, labelled

def load_tokenizer(base_model: Path, trust_remote_code: bool = False):
    """The tokenizer with the chat template training uses (its own, or a default from tokens it has; the
    system prompt kept where the template would lose it), and how that template renders (a ChatFormat)."""
    from transformers import AutoTokenizer

    from job import JobError

    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    try:
        chat_format = prepare_chat_template(tokenizer)
    except SkipExample as exc:
        raise JobError(f"the base model {base_model.name} cannot be used for chat training: {exc}") from None
    if chat_format.system_prompt != "template":
        log.info("the chat template of %s drops or refuses a system prompt: it is merged into the %s", base_model.name,
                 chat_format.system_prompt)
    return tokenizer, chat_format


CONVERSATIONS_PER_PROCESS = 200  # below this a labelling process costs more to start (~2 s) than it saves
_worker_tokenizer = None  # in a labelling process: (tokenizer, end-of-turn text)


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by the container's CPU quota (cgroup v2 `cpu.max`,
    which a container on a large host has while its affinity still lists every core of the host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def labelling_processes(conversations: int) -> int:
    """One per CONVERSATIONS_PER_PROCESS conversations, at most one per usable core."""
    return max(1, min(usable_cores(), conversations // CONVERSATIONS_PER_PROCESS))


def _start_labelling(base_model: Path, trust_remote_code: bool) -> None:
    """A labelling process's start: SIGTERM back to its default action (fork copies the job's handler, under which the
    process would outlive a terminate()), then the tokenizer, loaded once."""
    global _worker_tokenizer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    tokenizer, chat_format = load_tokenizer(base_model, trust_remote_code)
    _worker_tokenizer = tokenizer, chat_format.end_of_turn


def _label_chunk(first: int, conversations: list[dict], max_seq_length: int, tokenizer=None, eot_text: str = ""):
    """(examples, [(line, problem)]) for consecutive conversations numbered from `first`."""
    if tokenizer is None:
        tokenizer, eot_text = _worker_tokenizer
    examples, problems = [], []
    for i, conversation in enumerate(conversations, first):
        try:
            examples.append(tokenize_conversation(tokenizer, conversation, max_seq_length, eot_text))
        except SkipExample as exc:
            problems.append((i + 1, str(exc)))
    return examples, problems


def _label_in_processes(conversations: list[dict], max_seq_length: int, processes: int, base_model: Path,
                        trust_remote_code: bool) -> list[tuple]:
    """Each chunk's (examples, problems), in order, labelled in `processes` processes. Whatever ends the labelling
    early (SIGTERM's Stopped, a chunk's error, a process killed: a JobError saying how), every process it started is
    killed and reaped first."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import active_children, get_context

    from job import JobError

    size = math.ceil(len(conversations) / (4 * processes))  # a few chunks each: a slow one does not hold the rest
    # fork where there is one: a spawned process spends ~3 s importing transformers (and torch) before it labels
    # anything. The children only tokenize (no CUDA, no torch ops, no logging), which is what fork is safe for.
    context = get_context("fork" if sys.platform == "linux" else "spawn")
    others = set(active_children())
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_start_labelling,
                               initargs=(base_model, trust_remote_code))
    started = []
    try:
        futures = [pool.submit(_label_chunk, s, conversations[s:s + size], max_seq_length)
                   for s in range(0, len(conversations), size)]
        started = [p for p in active_children() if p not in others]  # every process has started by now
        chunks = [future.result() for future in futures]
        pool.shutdown()
        return chunks
    except BrokenProcessPool:  # a process died; the pool has just terminated the others
        raise JobError(_labelling_process_died(started, processes)) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        started += [p for p in active_children() if p not in others and p not in started]
        for process in started:
            process.kill()  # SIGKILL: one blocked writing its result to a pipe no one reads any more dies too
        for process in started:
            process.join()


def _labelling_process_died(started: list, processes: int) -> str:
    """Why labelling failed, from the exit codes of its processes (-N: killed by signal N), and what to do."""
    from multiprocessing.connection import wait

    ended = wait([p.sentinel for p in started], timeout=0)  # a process closes it as it dies, before it can be reaped
    for process in started:
        if process.sentinel in ended:
            process.join()
    codes = [p.exitcode for p in started if p.exitcode]
    # once one dies the pool terminates the others (SIGTERM): the first death is the code that is not that, if any
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else None)
    if code == -signal.SIGKILL:
        return (f"labelling the conversations failed: a labelling process was killed by SIGKILL, most likely by the "
                f"out-of-memory killer ({_memory()}, for {processes} labelling processes and the worker): use fewer or "
                "shorter conversations, a lower max_seq_length, or a worker with more memory")
    names = {number.value: number.name for number in signal.Signals}
    how = ("ended abruptly" if code is None else f"exited with code {code}" if code > 0
           else f"was killed by {names.get(-code, f'signal {-code}')}")
    return (f"labelling the conversations failed: a labelling process {how} (the worker's log may say why): resubmit "
            "the job; should it fail again, use fewer or shorter conversations, or a worker with more memory")


def _memory() -> str:
    """The memory there is, in words: the container's limit (cgroup v2 `memory.max`), else the machine's."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().split()[0]
        if limit != "max":
            return f"the container has {int(limit) / 2**30:.1f} GiB of memory"
    except (OSError, ValueError, IndexError):
        pass
    return f"the machine has {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB of memory"


def label_conversations(tokenizer, conversations: list[dict], max_seq_length: int, eot_text: str, *,
                        processes: int = 1, base_model: Path | None = None, trust_remote_code: bool = False):
    """Tokenize and label every conversation, in order; returns (examples, length report). With `processes` > 1
    (and `base_model`, whose tokenizer each process loads once) the conversations are labelled in that many
    processes, in contiguous chunks, and come back in their order: the same examples as in one."""
    if processes > 1 and base_model is not None and len(conversations) > 1:
        chunks = _label_in_processes(conversations, max_seq_length, processes, base_model, trust_remote_code)
    else:
        chunks = [_label_chunk(0, conversations, max_seq_length, tokenizer, eot_text)]
    examples = [e for chunk_examples, _ in chunks for e in chunk_examples]
    problems = [p for _, chunk_problems in chunks for p in chunk_problems]
    report = {
        "examples": len(examples),
        "shortened": sum(1 for e in examples if e.dropped_messages),
        "truncated": sum(1 for e in examples if e.truncated),
        "dropped": len(problems),
        "problems": [{"example": i, "message": f"example {i}: {message}"} for i, message in problems[:100]],
    }
    return examples, report


def preview(dataset: str, base_model: str, max_seq_length: int, limit: int | None = None) -> dict:
    """What the trainer would train on: per example, the token counts and the trained text."""
    from dataset_loader import load_dataset

    tokenizer, chat_format = load_tokenizer(Path(base_model))
    eot_text = chat_format.end_of_turn
    conversations, _ = load_dataset(dataset)
    examples = []
    for conversation in conversations[:limit]:
        try:
            ex = tokenize_conversation(tokenizer, conversation, max_seq_length, eot_text)
        except SkipExample as exc:
            examples.append({"skipped": str(exc)})
            continue
        examples.append({"num_tokens": len(ex.input_ids), "num_trained_tokens": ex.num_trained,
                         "trained_text": trained_runs(tokenizer, ex), "truncated": ex.truncated,
                         "dropped_messages": ex.dropped_messages, "_example": ex})
    return {"examples": examples, "template": tokenizer.chat_template, **chat_format.describe(),
            "eos_token": end_of_turn_token(tokenizer, eot_text), "_tokenizer": tokenizer}


def print_preview(result: dict, as_json: bool = False) -> None:
    """`train_lora.py preview`: each example's counts and its text with the trained runs marked (or JSON)."""
    tokenizer, examples = result.pop("_tokenizer"), result["examples"]
    if as_json:
        print(json.dumps({**result, "examples": [{k: v for k, v in e.items() if k != "_example"} for e in examples]},
                         ensure_ascii=False))
        return
    print(f"chat template: {result['template_source']}; end of turn {result['end_of_turn']!r}; system prompt {result['system_prompt']}")
    for i, e in enumerate(examples, 1):
        print(f"=== example {i}: " + (f"skipped: {e['skipped']}" if "skipped" in e else
              f"{e['num_tokens']} tokens, {e['num_trained_tokens']} trained, truncated={e['truncated']}"))
        if "_example" in e:
            print(marked_text(tokenizer, e["_example"]))


def marked_text(tokenizer, example: Example) -> str:
    """The rendered conversation with each trained run between »» and ««."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example.input_ids, example.labels):
        trained = label != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    text = (tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) for _, ids in runs)
    return "".join(t.join(("»»", "««")) if trained else t for (trained, _), t in zip(runs, text))


def sequences_to_tensors(sequences: list[list[Example]]) -> dict:
    """Sequences as a few flat tensors (what `torch.load(weights_only=True)` reads back: no pickled objects)."""
    import torch

    examples = [e for seq in sequences for e in seq]
    flat = lambda attr: torch.frombuffer(bytearray(b"".join(getattr(e, attr).tobytes() for e in examples)) or bytearray(4),
                                         dtype=torch.int32)[:sum(len(e.input_ids) for e in examples)]
    return {"input_ids": flat("input_ids"), "labels": flat("labels"),
            "lengths": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64),
            "per_sequence": torch.tensor([len(seq) for seq in sequences], dtype=torch.int64),
            "dropped_messages": torch.tensor([e.dropped_messages for e in examples], dtype=torch.int64),
            "truncated": torch.tensor([e.truncated for e in examples], dtype=torch.bool)}


def sequences_from_tensors(saved: dict) -> list[list[Example]]:
    ids, labels = saved["input_ids"].numpy().tobytes(), saved["labels"].numpy().tobytes()
    examples, offset = [], 0
    for length, dropped, truncated in zip(saved["lengths"].tolist(), saved["dropped_messages"].tolist(), saved["truncated"].tolist()):
        span = slice(4 * offset, 4 * (offset + length))
        example_ids, example_labels = array("i"), array("i")
        example_ids.frombytes(ids[span])
        example_labels.frombytes(labels[span])
        examples.append(Example(example_ids, example_labels, dropped, truncated))
        offset += length
    sequences, start = [], 0
    for count in saved["per_sequence"].tolist():
        sequences.append(examples[start:start + count])
        start += count
    return sequences


# ---------------------------------------------------------------------------- the job's data, prepared once

@dataclass
class Data:
    """The labelled dataset as training reads it: sequences (packed examples, or one each) and what labelling found."""
    fingerprint: str
    train: list
    validation: list
    counts: dict  # examples, validation_examples, validation_conversations
    length_report: dict
    packing: bool
    packing_note: str
    warnings: list
    labelled: str = ""  # how: "<n> process(es), <s> s", or "reused from the job directory"


DATA_FILE = "labelled-data.pt"
# Raise it when a change here changes the ids or labels written for a conversation: labelled data a job kept under
# another version is labelled again.
LABELLING_VERSION = 1
# The files a tokenizer is read from (the names transformers uses): their contents key the kept labelled data too.
TOKENIZER_FILES = re.compile(r"tokeni[sz]er.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                             r"chat_template.*|.*\.model|.*\.tiktoken")


def prepare_data(conversations: list[dict], base_path: Path, hp: Hyperparameters, trust_remote_code: bool = False,
                 keep_in: Path | None = None, fingerprint: str = "") -> Data:
    """Split off the validation conversations, label and pack both sides; with `keep_in` (the job's checkpoint
    directory) the result is kept there, and a resumed job reads it back while its fingerprint, LABELLING_VERSION and
    the tokenizer's files are the same and it holds only what labelling writes."""
    from base_models import load_config, packing_support
    from dataset_loader import split_validation
    from job import JobError

    path = keep_in / DATA_FILE if keep_in is not None and fingerprint else None
    started = time.monotonic()
    tokenizer, chat_format = load_tokenizer(base_path, trust_remote_code)
    key = {"fingerprint": fingerprint, "labelling_version": LABELLING_VERSION, "tokenizer": tokenizer_digest(base_path)}
    if path is not None and path.is_file() and (kept := _kept_data(path, key, len(tokenizer))) is not None:
        return kept
    train_convs, val_convs, split_warning = split_validation(conversations, hp.val_fraction, hp.seed)
    processes = labelling_processes(len(conversations))
    train_examples, length_report = label_conversations(
        tokenizer, train_convs, hp.max_seq_length, chat_format.end_of_turn, processes=processes, base_model=base_path,
        trust_remote_code=trust_remote_code)
    val_examples, _ = label_conversations(tokenizer, val_convs, hp.max_seq_length, chat_format.end_of_turn)
    if not train_examples:
        quoted = "; ".join(p["message"] for p in length_report["problems"][:3])
        raise JobError(f"no example could be tokenized for training: {quoted}")
    packing, packing_note = packing_support(load_config(base_path)) if hp.packing else (False, "off (packing: false)")
    sequences = (lambda ex: pack_examples(ex, hp.max_seq_length)) if packing else (lambda ex: [[e] for e in ex])
    if val_convs and not val_examples:  # every held-out conversation was longer than max_seq_length allows
        split_warning = (f"no validation loss: the {len(val_convs)} held-out line(s) could not fit max_seq_length="
                         f"{hp.max_seq_length} even with their oldest turns removed; raise max_seq_length, or hold out "
                         "more conversations (hyperparameters.val_fraction)")
    counts = {"examples": len(train_examples), "validation_examples": len(val_examples),
              "validation_conversations": len({c.get("conversation_id", i) for i, c in enumerate(val_convs)})}
    data = Data(fingerprint, sequences(train_examples), sequences(val_examples), counts, length_report, packing,
                packing_note, [w for w in (split_warning, hp.packing and not packing and f"packing {packing_note}") if w],
                f"{processes} process(es), {time.monotonic() - started:.1f} s")
    if path is not None:
        _keep_data(path, data, key)
    return data


def tokenizer_digest(base_model: Path) -> str:
    """sha256 over the names and contents of the base model's tokenizer files (TOKENIZER_FILES)."""
    digest = hashlib.sha256()
    for path in sorted(base_model.iterdir()):
        if TOKENIZER_FILES.fullmatch(path.name) and path.is_file():
            content = path.read_bytes()
            digest.update(f"{path.name}\0{len(content)}\0".encode() + content)
    return digest.hexdigest()


def _keep_data(path: Path, data: Data, key: dict) -> None:
    """Save `data` with its key; a cache: a failed write costs a resumed job the labelling, nothing else."""
    import torch

    from files import atomic_file, private_dir

    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    try:
        private_dir(path.parent)
        with atomic_file(path) as f:
            torch.save({**fields, "key": key, "train": sequences_to_tensors(data.train),
                        "validation": sequences_to_tensors(data.validation)}, f)
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        log.warning("could not keep the labelled data in %s (%s); a resumed job labels it again", path, exc)


def _kept_data(path: Path, key: dict, vocabulary: int) -> Data | None:
    """The labelled data kept in `path` when it was saved under `key` and holds only what labelling writes; else None,
    with a warning (the job labels again)."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        problem = ("it was labelled for another job input, labelling version or tokenizer" if saved.pop("key", None) != key
                   else _labels_problem(saved["train"], vocabulary) or _labels_problem(saved["validation"], vocabulary))
        if problem is None:
            log.info("labelled data reused from %s", path)
            return Data(**{**saved, "train": sequences_from_tensors(saved["train"]),
                           "validation": sequences_from_tensors(saved["validation"]),
                           "labelled": "reused from the job directory"})
    except Exception as exc:  # noqa: BLE001 - unreadable, or not what sequences_to_tensors writes
        problem = f"it could not be read ({type(exc).__name__}: {exc})"
    log.warning("could not reuse the labelled data in %s: %s; labelling again", path, problem)
    return None


def _labels_problem(saved: dict, vocabulary: int) -> str | None:
    """What in saved sequences (sequences_to_tensors) labelling never writes, or None: lengths that do not add up, a
    token id outside the vocabulary (the embedding's IndexError in training), a label neither IGNORE nor its token."""
    ids, labels, lengths = saved["input_ids"], saved["labels"], saved["lengths"]
    examples = (len(lengths), int(saved["per_sequence"].sum()), len(saved["dropped_messages"]), len(saved["truncated"]))
    if not (len(ids) == len(labels) == int(lengths.sum()) and bool((lengths > 0).all()) and len(set(examples)) == 1):
        return "its lengths do not add up"
    outside = ids[(ids < 0) | (ids >= vocabulary)]
    if len(outside):
        return f"it holds token id {int(outside[0])}, outside the tokenizer's {vocabulary}"
    if not bool(((labels == IGNORE) | (labels == ids)).all()):
        return "it holds a label that is neither ignored nor its own token"
    return None
