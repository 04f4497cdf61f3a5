"""Normalize what users upload into one canonical form of chat conversations, with a report.

Canonical form (OpenAI fine-tuning JSONL): one conversation per line,
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight": 0|1 (assistant only),
                   "tool_calls": [...] (assistant, optional)}, ...],
     "tools": [...] (optional), "conversation_id": str (optional)}
An assistant message is trained unless it carries `"weight": 0`. `conversation_id` groups lines that
share history (a BrightRun conversation's pairs), so that a validation split keeps them together.

Formats, detected per line:
- BrightRun LoRA v4/v5 pairs (`target_response`, `conversation_history`, ...; the `_meta` header line),
- the BrightRun app's own upload format (`conversation_id`, `turns` with `role`/`content`),
- OpenAI chat (`messages`), ShareGPT (`conversations` with `from`/`value`),
- Alpaca (`instruction`, `input`, `output`), prompt/completion (`prompt`, `completion`).

    python dataset_loader.py INPUT [--output OUT.jsonl] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from job import VALIDATION_MAX_HELD_OUT, VALIDATION_MIN_CONVERSATIONS, VALIDATION_SHARE, quoted, shorten

FORMATS = ("brightrun", "turns", "openai", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")
MAX_DECOMPRESSED_BYTES = 4 * 1024**3
MAX_LINE_BYTES = 64 * 1024**2  # one conversation; far beyond any context window
MAX_QUOTED_PROBLEMS = 5
MAX_REPORTED = 100  # problems (and warnings) kept in the report; the rest are counted
MAX_PROBLEM_CHARS = 300  # one problem's message (a quoted value or a key in a path could be megabytes)


class DatasetError(ValueError):
    """The dataset as a whole is unusable; the message says why and what to do."""


class LineProblem(Exception):
    """One line cannot be used. kind is 'invalid' (not understood) or 'skipped' (understood, excluded by a rule)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Report:
    """What the loader did with every line: every count, and the first MAX_REPORTED problems and warnings (a
    million bad lines would otherwise make a report larger than a job's result can be)."""

    examples: int = 0
    skipped: int = 0
    invalid: int = 0
    duplicates: int = 0
    blank_lines: int = 0
    merged_messages: int = 0
    formats: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)
    problems_left_out: int = 0
    warnings: list[str] = field(default_factory=list)

    def problem(self, kind: str, number: int, message: str) -> None:
        """Count a line that cannot be used (`kind`: "invalid" or "skipped"), and keep its message while few."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < MAX_REPORTED:
            self.problems.append({"line": number, "message": shorten(message, MAX_PROBLEM_CHARS)})
        else:
            self.problems_left_out += 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = dict(self.formats)
        d["warnings"] = self.warnings[:MAX_REPORTED] + (
            [f"... and {len(self.warnings) - MAX_REPORTED} more warnings"] if len(self.warnings) > MAX_REPORTED else [])
        return d


# ---------------------------------------------------------------------------- reading lines

def _open_bytes(path: Path, max_decompressed: int) -> io.BufferedIOBase:
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return _CappedReader(gzip.GzipFile(fileobj=raw), max_decompressed)
    raw.seek(0)
    return raw


class _CappedReader(io.RawIOBase):
    """Stops a gzip bomb: raises once more than `limit` decompressed bytes were read."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.seen = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.inner.readinto(buffer)
        self.seen += n
        if self.seen > self.limit:
            raise DatasetError(f"the gzip file decompresses to more than {self.limit} bytes: split it into smaller files")
        return n

    def close(self) -> None:
        self.inner.close()
        super().close()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (use null or a number)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_json(text: str) -> Any:
    return _DECODER.decode(text)


def _lines(stream, max_line_bytes: int) -> Iterator[bytes | None]:
    """Lines split on b"\n"; None for a line longer than `max_line_bytes` (its bytes are skipped, never held)."""
    while True:
        line = stream.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(1 << 20)
            yield None
            continue
        yield line


def iter_records(path: Path, report: Report, max_decompressed: int = MAX_DECOMPRESSED_BYTES,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) per non-blank line; problems for lines that are not JSON.

    Lines are split on b"\\n" only (U+2028 inside a string is text). A file whose first
    non-blank character is `[` is read as one JSON array, and its items are numbered from 1.
    """
    with _open_bytes(path, max_decompressed) as stream:
        buffered = io.BufferedReader(stream) if isinstance(stream, _CappedReader) else stream
        head = buffered.peek(4096)[:4096]
        if head.startswith(b"\xef\xbb\xbf"):
            report.warnings.append("the file starts with a UTF-8 byte order mark; it was ignored")
        lines = buffered
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            data = buffered.read()
            items = _array_items(data)
            if items is not None:
                report.warnings.append("the file is one JSON array: problems are numbered by item, not by line")
                for number, (item, size) in enumerate(items, start=1):
                    if size > max_line_bytes:
                        report.problem("invalid", number, f"item {number}: the item is longer than {max_line_bytes} "
                                       "bytes; split this conversation or shorten it")
                    else:
                        yield number, item
                return
            lines = io.BytesIO(data)  # not one array: JSON Lines whose first line happens to be an array
        for number, raw in enumerate(_lines(lines, max_line_bytes), start=1):
            if raw is None:
                report.problem("invalid", number, f"line {number}: the line is longer than {max_line_bytes} bytes; "
                               "split this conversation or shorten it")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"line {number} is not UTF-8 (byte {exc.start}): save the file as UTF-8 and resubmit"
                ) from None
            if text.isspace() or not text:
                report.blank_lines += 1
                continue
            try:
                yield number, _parse_json(text)
            except RecursionError:
                report.problem("invalid", number, f"line {number}: nested too deeply to read")
            except ValueError as exc:
                report.problem("invalid", number, f"line {number}: not valid JSON: {exc}")


def _array_items(data: bytes) -> list[tuple[Any, int]] | None:
    """The items of a file that is one JSON array, each with its size in characters (held to the line limit), or
    None when the file is not one array."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        return None
    items, position = [], _skip_space(text, position + 1)
    try:
        while not text.startswith("]", position):
            item, end = _DECODER.raw_decode(text, position)
            items.append((item, end - position))
            position = _skip_space(text, end)
            if text.startswith(",", position):
                position = _skip_space(text, position + 1)
            elif not text.startswith("]", position):
                return None
    except (ValueError, RecursionError):
        return None
    return items if not text[position + 1:].strip() else None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


# ---------------------------------------------------------------------------- formats

def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "turns" in record:
        return "turns"
    if "target_response" in record or "current_user_input" in record or "conversation_history" in record:
        return "brightrun"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def _text(value: Any, where: str, *, allow_none: bool = False) -> str | None:
    """A message content: a string, or a list of text parts (joined)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise LineProblem(f"`{where}` must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, got {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__.replace("str", "string").replace("dict", "object").replace("list", "array")


def _system_message(record: dict, key: str) -> list[dict]:
    """The optional system prompt under `key`, as a list of zero or one message."""
    system = record.get(key)
    if system is not None and not isinstance(system, str):
        raise LineProblem(f"`{key}` must be a string, got {_kind(system)}")
    return [{"role": "system", "content": system}] if system and system.strip() else []


def normalize_brightrun(record: dict) -> list[dict]:
    """A BrightRun pair → messages. Only `target_response` is trained; the history is context.

    In real exports the history already ends with the current user message; it is not added twice.
    """
    target = record.get("target_response")
    if target is None or (isinstance(target, str) and not target.strip()):
        raise LineProblem("`target_response` is empty: nothing to train on", kind="skipped")
    if not isinstance(target, str):
        raise LineProblem(f"`target_response` must be a string, got {_kind(target)}")
    messages = _system_message(record, "system_prompt")
    history = record.get("conversation_history") or []
    if not isinstance(history, list):
        raise LineProblem(f"`conversation_history` must be an array, got {_kind(history)}")
    for i, turn in enumerate(history):
        if not isinstance(turn, dict):
            raise LineProblem(f"`conversation_history[{i}]` must be an object, got {_kind(turn)}")
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise LineProblem(f"`conversation_history[{i}].role` is {quoted(role)}; expected user or assistant")
        content = turn.get("content")
        if not isinstance(content, str):
            raise LineProblem(f"`conversation_history[{i}].content` must be a string, got {_kind(content)}")
        messages.append({"role": role, "content": content} | ({"weight": 0} if role == "assistant" else {}))
    current = record.get("current_user_input")
    if current is not None and not isinstance(current, str):
        raise LineProblem(f"`current_user_input` must be a string, got {_kind(current)}")
    last = messages[-1] if messages else None
    already_there = (last is not None and last["role"] == "user" and current is not None
                     and (last["content"] == current or last["content"].strip() == current.strip()))
    if current and current.strip() and not already_there:
        messages.append({"role": "user", "content": current})
    messages.append({"role": "assistant", "content": target, "weight": 1})
    return messages


def normalize_openai(record: dict) -> list[dict]:
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise LineProblem(f"`messages` must be a non-empty array, got {_kind(raw)}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise LineProblem(f"`messages[{i}]` must be an object, got {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise LineProblem(f"`messages[{i}].role` is {quoted(role)}; expected system, user, assistant or tool")
        has_tool_calls = role == "assistant" and m.get("tool_calls") is not None
        content = _text(m.get("content"), f"messages[{i}].content", allow_none=has_tool_calls)
        # "" beside tool calls, not null: transformers 5 drops null keys before rendering, and templates then fail
        out = {"role": role, "content": content if content is not None else ""}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise LineProblem(f"`messages[{i}].name` must be a string, got {_kind(m['name'])}")
            out["name"] = m["name"]
        if has_tool_calls:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str) for c in calls):
                raise LineProblem(f"`messages[{i}].tool_calls` must be an array of {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
            out["tool_calls"] = calls
        if role == "tool":
            if "tool_call_id" in m:
                out["tool_call_id"] = m["tool_call_id"]
        if "weight" in m:
            weight = m["weight"]
            if weight not in (0, 1) or isinstance(weight, bool):
                raise LineProblem(f"`messages[{i}].weight` is {quoted(weight)}; expected 0 or 1")
            if role != "assistant" and weight != 0:
                raise LineProblem(f"`messages[{i}].weight` is 1 on a {role} message; only assistant messages can be trained")
            if role == "assistant":
                out["weight"] = int(weight)
        elif role == "assistant":
            out["weight"] = 1
        messages.append(out)
    return messages


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}


def _speaker_turns(raw: Any, field: str, speaker_key: str, text_key: str, expected: str) -> list[dict]:
    """A list of turns naming their speaker (ShareGPT's `from`/`value`, the app's `role`/`content`) → messages;
    every assistant turn is trained."""
    if not isinstance(raw, list) or not raw:
        raise LineProblem(f"`{field}` must be a non-empty array, got {_kind(raw)}")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise LineProblem(f"`{field}[{i}]` must be an object, got {_kind(turn)}")
        speaker = turn.get(speaker_key)
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise LineProblem(f"`{field}[{i}].{speaker_key}` is {quoted(speaker)}; expected {expected}")
        content = _text(turn.get(text_key), f"{field}[{i}].{text_key}")
        messages.append({"role": role, "content": content} | ({"weight": 1} if role == "assistant" else {}))
    return messages


def normalize_sharegpt(record: dict) -> list[dict]:
    turns = _speaker_turns(record["conversations"], "conversations", "from", "value", "human, gpt or system")
    return _system_message(record, "system") + turns


def normalize_turns(record: dict) -> list[dict]:
    """The BrightRun app's upload format (what its dataset validator accepts):
    `{"conversation_id": ..., "turns": [{"role": "user", "content": "..."}, ...]}`."""
    return _speaker_turns(record["turns"], "turns", "role", "content", "system, user or assistant")


def normalize_alpaca(record: dict) -> list[dict]:
    messages = _system_message(record, "system")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise LineProblem("`history` must be an array of [instruction, response] string pairs")
    for prompt, answer in history:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer, "weight": 0}]
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str):
            raise LineProblem(f"`{name}` must be a string, got {_kind(value)}")
    if extra is not None and not isinstance(extra, str):
        raise LineProblem(f"`input` must be a string, got {_kind(extra)}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    if not output.strip():
        raise LineProblem("`output` is empty: nothing to train on", kind="skipped")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output, "weight": 1}]


def normalize_prompt_completion(record: dict) -> list[dict]:
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise LineProblem(f"`{name}` must be a string, got {_kind(value)}")
    if not completion.strip():
        raise LineProblem("`completion` is empty: nothing to train on", kind="skipped")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion, "weight": 1}]


NORMALIZERS = {"brightrun": normalize_brightrun, "turns": normalize_turns, "openai": normalize_openai,
               "sharegpt": normalize_sharegpt, "alpaca": normalize_alpaca, "prompt_completion": normalize_prompt_completion}


def _conversation_id(record: dict) -> str | None:
    """The id that groups lines of one conversation (BrightRun pairs, the app's `turns`), if the line has one."""
    value = record.get("conversation_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        return None
    return str(value)


def finalize(messages: list[dict]) -> tuple[list[dict], int]:
    """Merge consecutive same-role messages, check the system position and that something is trained.

    Returns the messages and how many were merged away. A merged assistant message is trained if
    any of its parts was. Tool messages and tool calls are never merged.
    """
    out: list[dict] = []
    merged = 0
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise LineProblem(f"message {i} is a system message; a system message may only come first")
        prev = out[-1] if out else None
        mergeable = (prev is not None and prev["role"] == m["role"] and m["role"] in ("user", "assistant")
                     and "tool_calls" not in prev and "tool_calls" not in m and prev.get("name") == m.get("name"))
        if mergeable:
            prev["content"] = f"{prev['content']}\n\n{m['content']}"
            if m["role"] == "assistant":
                prev["weight"] = max(prev["weight"], m["weight"])
            merged += 1
        else:
            out.append(m)  # the normalizers build fresh dicts: no copy needed
    if not any(m["role"] == "assistant" and m.get("weight", 1) and ((m["content"] or "").strip() or m.get("tool_calls"))
               for m in out):
        raise LineProblem("no assistant message to train on (none, empty, or all weight 0)", kind="skipped")
    return out, merged


# ---------------------------------------------------------------------------- the whole file

def fingerprint(conversation: dict) -> tuple:
    """A hashable key holding everything that makes a conversation what it is (exact duplicates only:
    the set compares the strings themselves, so two different conversations never collide)."""
    def extra(m: dict) -> str | None:
        if "tool_calls" in m or "tool_call_id" in m:
            return json.dumps([m.get("tool_calls"), m.get("tool_call_id")], sort_keys=True)
        return None

    key = tuple((m["role"], m.get("weight"), m.get("name"), m["content"], extra(m)) for m in conversation["messages"])
    return key + ((json.dumps(conversation["tools"], sort_keys=True),) if "tools" in conversation else ())


def _meta_header(record: dict, number: int, report: Report) -> dict:
    meta = record["_meta"]
    if not isinstance(meta, dict):
        report.warnings.append(f"line {number}: `_meta` is not an object; ignored")
        return {}
    return meta


def load_dataset(path: str | Path, *, max_invalid_fraction: float = 0.1, check: bool = True,
                 max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES, max_line_bytes: int = MAX_LINE_BYTES,
                 max_examples: int | None = None, max_chars: int | None = None) -> tuple[list[dict], Report]:
    """Read `path` and return (canonical conversations, report).

    Raises DatasetError when the file cannot be read, holds more than `max_examples` conversations or `max_chars`
    characters of messages (what the worker can hold in memory), or (with `check`) when it is unusable: nothing
    loaded, or more than `max_invalid_fraction` of its non-blank lines invalid or skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    if path.stat().st_size == 0:
        raise DatasetError("the dataset file is empty (0 bytes): export the dataset again and resubmit")
    report = Report()
    try:
        return _load(path, report, max_invalid_fraction, check, max_decompressed_bytes, max_line_bytes, max_examples, max_chars)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"the gzip file is corrupt or truncated ({exc}): export and upload it again") from None


_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair from JSON decodes to one character: what is left is unpaired


def _surrogate_at(value: Any, where: str = "") -> str | None:
    """Where in a parsed line an unpaired UTF-16 surrogate sits (UTF-8 cannot encode it), or None."""
    if isinstance(value, str):
        return where or "the line" if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(str(key)):
                return f"a key of {where or 'the line'}"
            found = _surrogate_at(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _surrogate_at(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _load(path: Path, report: Report, max_invalid_fraction: float, check: bool, max_decompressed_bytes: int,
          max_line_bytes: int, max_examples: int | None, max_chars: int | None) -> tuple[list[dict], Report]:
    conversations: list[dict] = []
    seen: set[tuple] = set()
    meta: dict = {}
    brightrun_lines = chars = 0
    for number, record in iter_records(path, report, max_decompressed_bytes, max_line_bytes):
        if isinstance(record, dict) and "_meta" in record and detect_format(record) is None:
            meta = _meta_header(record, number, report)
            continue
        try:
            surrogate = _surrogate_at(record)
            if surrogate:
                raise LineProblem(f"`{surrogate}` holds an unpaired UTF-16 surrogate (a character cut in half, e.g. an "
                                  "emoji split by a JavaScript export): fix or remove that character")
            if not isinstance(record, dict):
                raise LineProblem(f"expected a JSON object, got {_kind(record)}")
            fmt = detect_format(record)
            if fmt is None:
                keys = ", ".join(sorted(record)[:8]) or "none"
                raise LineProblem(
                    f"unrecognized format (keys: {keys}); expected `messages` (OpenAI chat), `conversations` (ShareGPT), "
                    "`turns` (the BrightRun app's format), `instruction`/`output` (Alpaca), `prompt`/`completion`, "
                    "or a BrightRun pair with `target_response`"
                )
            if fmt == "brightrun":
                brightrun_lines += 1
            messages, merged = finalize(NORMALIZERS[fmt](record))
        except LineProblem as problem:
            report.problem(problem.kind, number, f"line {number}: {problem}")
            continue
        conversation = {"messages": messages}
        if fmt == "openai" and isinstance(record.get("tools"), list):
            conversation["tools"] = record["tools"]
        group = _conversation_id(record)
        if group is not None:
            conversation["conversation_id"] = group
        key = fingerprint(conversation)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.merged_messages += merged
        report.formats[fmt] += 1
        conversations.append(conversation)
        chars += sum(len(m["content"]) for m in messages)
        if max_examples is not None and len(conversations) > max_examples:
            raise DatasetError(f"the dataset holds more than {max_examples} conversations, more than this worker loads at "
                               "once (MAX_DATASET_EXAMPLES): split it into several jobs, or raise the limit on a worker "
                               "with more memory")
        if max_chars is not None and chars > max_chars:
            raise DatasetError(f"the dataset holds more than {max_chars} characters of messages, more than this worker "
                               "loads at once (MAX_DATASET_CHARS): split it into several jobs, or raise the limit on a "
                               "worker with more memory")
    report.examples = len(conversations)
    if meta:
        declared = meta.get("total_pairs")
        if isinstance(declared, int) and declared != brightrun_lines:
            report.warnings.append(f"the _meta header says total_pairs={declared} but the file holds {brightrun_lines} pairs")
    if check:
        check_usable(report, max_invalid_fraction)
    return conversations, report


def check_usable(report: Report, max_invalid_fraction: float) -> None:
    """Refuse a dataset with nothing to train, or with more than `max_invalid_fraction` of its lines unusable:
    invalid ones (not understood) and skipped ones (understood, but with nothing to train) alike."""
    considered = report.examples + report.skipped + report.invalid + report.duplicates
    quoted = "; ".join(p["message"] for p in report.problems[:MAX_QUOTED_PROBLEMS])
    left = len(report.problems) + report.problems_left_out - MAX_QUOTED_PROBLEMS
    more = f" (and {left} more)" if left > 0 else ""
    if report.examples == 0:
        raise DatasetError(f"no usable example in the dataset{': ' + quoted + more if quoted else ''}")
    unusable = report.invalid + report.skipped
    if considered and unusable / considered > max_invalid_fraction:
        raise DatasetError(
            f"{unusable} of {considered} lines cannot be used ({report.skipped} skipped, {report.invalid} invalid; more "
            f"than {max_invalid_fraction:.0%}): {quoted}{more}. Fix these lines, or raise max_invalid_fraction, and resubmit"
        )


def write_jsonl(conversations: list[dict], path: str | Path) -> None:
    """The canonical JSONL, written whole or not at all (files.atomic_file)."""
    from files import atomic_file

    with atomic_file(Path(path), "w") as f:
        for c in conversations:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="dataset file (JSONL, JSON array, optionally gzip)")
    parser.add_argument("--output", help="write the canonical JSONL here")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--max-invalid-fraction", type=float, default=0.1, help="fail when more lines than this are invalid")
    args = parser.parse_args(argv)
    try:
        conversations, report = load_dataset(args.input, check=False)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_usable(report, args.max_invalid_fraction)
        usable = None
    except DatasetError as exc:
        usable = exc
    if args.output and usable is None:
        write_jsonl(conversations, args.output)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        formats = ", ".join(f"{k} {v}" for k, v in report.formats.items())
        print(f"{report.examples} examples ({formats}); {report.skipped} skipped, {report.invalid} invalid, "
              f"{report.duplicates} duplicates, {report.merged_messages} messages merged")
        for p in report.problems:
            print(f"  {p['message']}")
        for w in report.warnings:
            print(f"  warning: {w}")
    if usable is not None:
        print(f"error: {usable}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def split_validation(conversations: list[dict], fraction: float | None, seed: int) -> tuple[list[dict], list[dict], str | None]:
    """(training, validation, a warning or None). Whole conversations are held out: lines with the same
    `conversation_id` (the pairs of one BrightRun conversation, which share their history) stay on one
    side. `fraction` None is the default rule (job.VALIDATION_SHARE of the conversations, at most
    VALIDATION_MAX_HELD_OUT, once there are VALIDATION_MIN_CONVERSATIONS); 0 holds out nothing."""
    groups: dict[tuple, list[int]] = {}
    for i, conversation in enumerate(conversations):
        key = ("id", conversation["conversation_id"]) if "conversation_id" in conversation else ("line", i)
        groups.setdefault(key, []).append(i)
    if fraction == 0:
        return conversations, [], None
    if fraction is None and len(groups) < VALIDATION_MIN_CONVERSATIONS:
        return conversations, [], (f"no validation loss: the dataset has {len(groups)} conversations, fewer than the "
                                   f"{VALIDATION_MIN_CONVERSATIONS} needed to hold some out by default; set "
                                   "hyperparameters.val_fraction to hold out a share anyway")
    if len(groups) < 2:
        return conversations, [], "no validation loss: the dataset has one conversation, none can be held out"
    if fraction is None:
        held_out = min(VALIDATION_MAX_HELD_OUT, max(1, round(len(groups) * VALIDATION_SHARE)))
    else:
        held_out = min(len(groups) - 1, max(1, round(len(groups) * fraction)))
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    validation = {i for key in keys[:held_out] for i in groups[key]}
    return ([c for i, c in enumerate(conversations) if i not in validation],
            [c for i, c in enumerate(conversations) if i in validation], None)

