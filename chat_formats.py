"""Chat formats: each upload format a line may hold, normalized to the canonical form of one conversation.

Canonical form (OpenAI fine-tuning JSONL): one conversation per line,
    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight": 0|1 (assistant only),
                   "tool_calls": [...] (assistant, optional)}, ...],
     "tools": [...] (optional), "conversation_id": str (optional)}
An assistant message is trained unless it carries `"weight": 0`. `conversation_id` groups lines that
share history (a BrightRun conversation's pairs), so that a validation split keeps them together.

Formats, detected per line (`detect_format`), each with its normalizer (`NORMALIZERS`):
- BrightRun LoRA v4/v5 pairs (`target_response`, `conversation_history`, ...),
- the BrightRun app's own upload format (`conversation_id`, `turns` with `role`/`content`),
- OpenAI chat (`messages`), ShareGPT (`conversations` with `from`/`value`),
- Alpaca (`instruction`, `input`, `output`), prompt/completion (`prompt`, `completion`).

A line that cannot be used raises `LineProblem`, naming the field and what is expected.
"""

from __future__ import annotations

import json
from typing import Any

from job import quoted

FORMATS = ("brightrun", "turns", "openai", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")


class LineProblem(Exception):
    """One line cannot be used. kind is 'invalid' (not understood) or 'skipped' (understood, excluded by a rule)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


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
    if isinstance(value, list) and all(_is_text_part(p) for p in value):
        return "".join(p["text"] for p in value)
    raise LineProblem(f"`{where}` must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts, "
                      f"got {json_kind(value)}")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: `json_kind([])` is "array", `json_kind(None)` is "null"."""
    if value is None:
        return "null"
    return type(value).__name__.replace("str", "string").replace("dict", "object").replace("list", "array")


def _system_message(record: dict, key: str) -> list[dict]:
    """The optional system prompt under `key`, as a list of zero or one message."""
    system = record.get(key)
    if system is not None and not isinstance(system, str):
        raise LineProblem(f"`{key}` must be a string, got {json_kind(system)}")
    return [{"role": "system", "content": system}] if system and system.strip() else []


def normalize_brightrun(record: dict) -> list[dict]:
    """A BrightRun pair → messages. Only `target_response` is trained; the history is context.

    In real exports the history already ends with the current user message; it is not added twice.
    """
    target = record.get("target_response")
    if target is None or (isinstance(target, str) and not target.strip()):
        raise LineProblem("`target_response` is empty: nothing to train on", kind="skipped")
    if not isinstance(target, str):
        raise LineProblem(f"`target_response` must be a string, got {json_kind(target)}")
    messages = _system_message(record, "system_prompt")
    history = record.get("conversation_history") or []
    if not isinstance(history, list):
        raise LineProblem(f"`conversation_history` must be an array, got {json_kind(history)}")
    for i, turn in enumerate(history):
        if not isinstance(turn, dict):
            raise LineProblem(f"`conversation_history[{i}]` must be an object, got {json_kind(turn)}")
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise LineProblem(f"`conversation_history[{i}].role` is {quoted(role)}; expected user or assistant")
        content = turn.get("content")
        if not isinstance(content, str):
            raise LineProblem(f"`conversation_history[{i}].content` must be a string, got {json_kind(content)}")
        messages.append({"role": role, "content": content} | ({"weight": 0} if role == "assistant" else {}))
    current = record.get("current_user_input")
    if current is not None and not isinstance(current, str):
        raise LineProblem(f"`current_user_input` must be a string, got {json_kind(current)}")
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
        raise LineProblem(f"`messages` must be a non-empty array, got {json_kind(raw)}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise LineProblem(f"`messages[{i}]` must be an object, got {json_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise LineProblem(f"`messages[{i}].role` is {quoted(role)}; expected system, user, assistant or tool")
        has_tool_calls = role == "assistant" and m.get("tool_calls") is not None
        content = _text(m.get("content"), f"messages[{i}].content", allow_none=has_tool_calls)
        # "" beside tool calls, not null: transformers 5 drops null keys before rendering, and templates then fail
        out = {"role": role, "content": content if content is not None else ""}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise LineProblem(f"`messages[{i}].name` must be a string, got {json_kind(m['name'])}")
            out["name"] = m["name"]
        if has_tool_calls:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(_is_tool_call(c) for c in calls):
                raise LineProblem(f"`messages[{i}].tool_calls` must be an array of "
                                  "{\"function\": {\"name\": ..., \"arguments\": ...}}")
            out["tool_calls"] = calls
        if role == "tool":
            if "tool_call_id" in m:
                out["tool_call_id"] = m["tool_call_id"]
        if "weight" in m:
            weight = m["weight"]
            if weight not in (0, 1) or isinstance(weight, bool):
                raise LineProblem(f"`messages[{i}].weight` is {quoted(weight)}; expected 0 or 1")
            if role != "assistant" and weight != 0:
                raise LineProblem(f"`messages[{i}].weight` is 1 on a {role} message; "
                                  "only assistant messages can be trained")
            if role == "assistant":
                out["weight"] = int(weight)
        elif role == "assistant":
            out["weight"] = 1
        messages.append(out)
    return messages


def _is_tool_call(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return isinstance(function, dict) and isinstance(function.get("name"), str)


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}


def _speaker_turns(raw: Any, field: str, speaker_key: str, text_key: str, expected: str) -> list[dict]:
    """A list of turns naming their speaker (ShareGPT's `from`/`value`, the app's `role`/`content`) → messages;
    every assistant turn is trained."""
    if not isinstance(raw, list) or not raw:
        raise LineProblem(f"`{field}` must be a non-empty array, got {json_kind(raw)}")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise LineProblem(f"`{field}[{i}]` must be an object, got {json_kind(turn)}")
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
    if not isinstance(history, list) or not all(_is_string_pair(h) for h in history):
        raise LineProblem("`history` must be an array of [instruction, response] string pairs")
    for prompt, answer in history:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer, "weight": 0}]
    instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str):
            raise LineProblem(f"`{name}` must be a string, got {json_kind(value)}")
    if extra is not None and not isinstance(extra, str):
        raise LineProblem(f"`input` must be a string, got {json_kind(extra)}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    if not output.strip():
        raise LineProblem("`output` is empty: nothing to train on", kind="skipped")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output, "weight": 1}]


def _is_string_pair(item: Any) -> bool:
    """An Alpaca `history` entry: [instruction, response], both strings."""
    return isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)


def normalize_prompt_completion(record: dict) -> list[dict]:
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise LineProblem(f"`{name}` must be a string, got {json_kind(value)}")
    if not completion.strip():
        raise LineProblem("`completion` is empty: nothing to train on", kind="skipped")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion, "weight": 1}]


NORMALIZERS = {"brightrun": normalize_brightrun, "turns": normalize_turns, "openai": normalize_openai,
               "sharegpt": normalize_sharegpt, "alpaca": normalize_alpaca,
               "prompt_completion": normalize_prompt_completion}


def conversation_id(record: dict) -> str | None:
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


def line_format(record: Any) -> str:
    """The format of one parsed line; LineProblem, listing what is expected, when it is none of them."""
    if not isinstance(record, dict):
        raise LineProblem(f"expected a JSON object, got {json_kind(record)}")
    fmt = detect_format(record)
    if fmt is None:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise LineProblem(
            f"unrecognized format (keys: {keys}); expected `messages` (OpenAI chat), `conversations` (ShareGPT), "
            "`turns` (the BrightRun app's format), `instruction`/`output` (Alpaca), `prompt`/`completion`, "
            "or a BrightRun pair with `target_response`"
        )
    return fmt


def canonical_conversation(record: dict, fmt: str) -> tuple[dict, int]:
    """A line of format `fmt` → (its canonical conversation, how many messages were merged away); LineProblem when
    it cannot be used. OpenAI `tools` and the `conversation_id` are kept."""
    messages, merged = finalize(NORMALIZERS[fmt](record))
    conversation = {"messages": messages}
    if fmt == "openai" and isinstance(record.get("tools"), list):
        conversation["tools"] = record["tools"]
    group = conversation_id(record)
    if group is not None:
        conversation["conversation_id"] = group
    return conversation, merged


def fingerprint(conversation: dict) -> tuple:
    """A hashable key holding everything that makes a conversation what it is (exact duplicates only:
    the set compares the strings themselves, so two different conversations never collide)."""
    def extra(m: dict) -> str | None:
        if "tool_calls" in m or "tool_call_id" in m:
            return json.dumps([m.get("tool_calls"), m.get("tool_call_id")], sort_keys=True)
        return None

    key = tuple((m["role"], m.get("weight"), m.get("name"), m["content"], extra(m)) for m in conversation["messages"])
    return key + ((json.dumps(conversation["tools"], sort_keys=True),) if "tools" in conversation else ())
