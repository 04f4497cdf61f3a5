"""Conversations → token ids and labels that train exactly the assistant's words and end-of-turn; the text budget and
truncation, packing, the tensors (and attention mask) of a micro-batch, and `train_lora.py preview`'s view of it.

The trained tokens of a conversation are its assistant messages with weight ≠ 0 plus the token(s)
that close each of those turns (so the model learns to stop); nothing else. Spans are found in the
rendered text (chat_templates.render), not through `{% generation %}` markers (most real templates, Qwen2.5 and
Mistral among them, have none): each assistant message's content is located in the full rendering, starting
where the rendering of the conversation before it ends, and extended over the template's end-of-turn
text. Character spans map to tokens through the tokenizer's offsets, so a SentencePiece token that
merges a leading space with the first word is trained.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask

from chat_templates import SkipExample, end_of_turn_token, load_tokenizer, render, shared_start, supports_tools
from dataset_loader import load_dataset

IGNORE = -100


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



# Answers are found in the rendering exactly: the conversation is rendered once with each trained answer replaced by
# a placeholder (private-use characters no template writes), so where each answer sits is known, whatever else in
# the conversation repeats its words; the real rendering must then be the placeholder rendering with the answers put
# back (a template that rewrites an answer as it renders it is named, not guessed at).
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDERS = re.compile("\ue000(\\d+)\ue001")


def trained_char_spans(tokenizer, messages: list[dict], tools: list | None,
                       eot_text: str) -> tuple[str, list[tuple[int, int]]]:
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
    if missing or full != render(tokenizer, [dict(m, content=texts[k]) if k in texts else m
                                             for k, m in enumerate(messages)], tools):
        k = missing[0] if missing else next(iter(texts))
        raise SkipExample(f"the chat template rewrites assistant message {k} as it renders it (e.g. a <think> part "
                          "moved out of its text), so its tokens cannot be told from the template's: remove that part "
                          "of the answer, or train a base model whose template renders answers as written")
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
    start = len(prompt) + shared_start(tokenizer, before[len(prompt):] if before.startswith(prompt) else "",
                                        full[len(prompt):])
    end = full.find(eot_text, start)
    called = full[start:end if end >= 0 else len(full)]
    if end < 0 or not all(str(c["function"]["name"]) in called for c in messages[k]["tool_calls"]):
        raise SkipExample(f"the chat template does not render the tool calls of assistant message {k} (it drops them "
                          "or does not end them with its end of turn): remove them, or train a base model whose "
                          "template renders tool calls")
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
        raise SkipExample(f"the conversation cannot fit max_seq_length={max_seq_length} even with its oldest turns "
                          "removed: its last turn with a trained answer, with the system prompt and tools, holds more "
                          f"than {budget:,} bytes of text ({MAX_BYTES_PER_TOKEN} a token) or {max_seq_length} "
                          "messages, and a trained answer is never cut: shorten its messages, or raise max_seq_length")
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
    (architecture.isolate_packed_examples): the examples (and each row's padding) as the rows of a batch, in groups of
    similar length, each group a (gather, source, destination) triple of token indices into the flat (B x L)
    sequence, with B x L standing for an all-zero padding token. A group pads to at most 1.5x its real tokens
    (lengths rounded up to PACKED_CHUNK). Built here on the CPU and sent ahead: the layers read nothing back.
    None when no row holds more than one example."""
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

    Returns input_ids and labels (B, L), position_ids restarting at 0 for each example, and the
    attention mask (attention_mask: it keeps packed examples apart).
    Padding is never trained. The (B, L) tensors are filled on the CPU and moved to `device`; the
    L x L mask is built there (on a GPU: no 8 x 2048 x 2048 mask crossing the bus every step).

    `per_example`: the index groups that run each packed example on its own in linear-attention layers,
    which the mask does not reach (per_example_groups; None when no row is packed).

    For the loss: `loss_index`, the flat (B x L) positions whose next token is trained, and
    `loss_targets`, those tokens; found here on the CPU, so that selecting them on the GPU is an
    index_select (a boolean mask there would make the CPU wait for the GPU to count it).
    """
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
    packed = not all(len(seq) == 1 for seq in sequences)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": attention_mask(segment, packed, attention, device), "per_example": per_example,
            "loss_index": loss_index, "loss_targets": loss_targets, "real_tokens": real_tokens,
            "trained_tokens": trained_tokens, "computed_tokens": batch * length}


def attention_mask(segment, packed: bool, attention: str = "sdpa", device: str = "cpu"):
    """The attention mask of a micro-batch whose (B, L) `segment` numbers each token's example in its row (-1:
    padding). When a row holds several examples (`packed`), a mask that is causal within each example and
    blocks attention across examples (position_ids alone do not isolate packed examples under sdpa or
    eager): for `attention="flex_attention"` a BlockMask (a document mask: flex attention skips the
    blocks it rules out), else a boolean 4D mask (B, 1, L, L); with one example per row, the plain (B, L)
    padding mask. Built on `segment`'s device."""
    real = segment >= 0
    if not packed:
        # One example per row: a plain padding mask lets attention use its fast causal kernels.
        return real.long()
    batch, length = segment.shape
    if attention == "flex_attention":
        def same_example_causal(b, h, q, kv):  # padding attends to padding: never trained
            return (segment[b, q] == segment[b, kv]) & (q >= kv)

        return create_block_mask(same_example_causal, batch, None, length, length, device=device)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
    same = segment[:, :, None] == segment[:, None, :]
    mask = same & causal & real[:, :, None]
    mask |= torch.eye(length, dtype=torch.bool, device=device)  # padding rows attend to themselves
    return mask[:, None]


def preview(dataset: str, base_model: str, max_seq_length: int, limit: int | None = None) -> dict:
    """What the trainer would train on: per example, the token counts and the trained text."""
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
    print(f"chat template: {result['template_source']}; end of turn {result['end_of_turn']!r}; "
          f"system prompt {result['system_prompt']}")
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
    examples = [e for seq in sequences for e in seq]

    def flat(attr: str):
        data = bytearray(b"".join(getattr(e, attr).tobytes() for e in examples)) or bytearray(4)
        return torch.frombuffer(data, dtype=torch.int32)[:sum(len(e.input_ids) for e in examples)]

    return {"input_ids": flat("input_ids"), "labels": flat("labels"),
            "lengths": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64),
            "per_sequence": torch.tensor([len(seq) for seq in sequences], dtype=torch.int64),
            "dropped_messages": torch.tensor([e.dropped_messages for e in examples], dtype=torch.int64),
            "truncated": torch.tensor([e.truncated for e in examples], dtype=torch.bool)}


def sequences_from_tensors(saved: dict) -> list[list[Example]]:
    ids, labels = saved["input_ids"].numpy().tobytes(), saved["labels"].numpy().tobytes()
    examples, offset = [], 0
    for length, dropped, truncated in zip(saved["lengths"].tolist(), saved["dropped_messages"].tolist(),
                                          saved["truncated"].tolist()):
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

