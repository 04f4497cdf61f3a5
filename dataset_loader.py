"""Read an uploaded dataset file into canonical chat conversations (`chat_formats`), with a report of every line.

The file is JSON Lines or one JSON array, optionally gzip; each line is detected and normalized on its own
(`chat_formats` holds the formats and the canonical form). A line that cannot be used is counted and named in the
report with its number; exact duplicates are dropped; the whole is refused when too little of it can be used.

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

from chat_formats import LineProblem, canonical_conversation, detect_format, fingerprint, line_format
from files import atomic_file
from job import VALIDATION_MAX_HELD_OUT, VALIDATION_MIN_CONVERSATIONS, VALIDATION_SHARE, shorten

MAX_DECOMPRESSED_BYTES = 4 * 1024**3
MAX_LINE_BYTES = 64 * 1024**2  # one conversation; far beyond any context window
MAX_QUOTED_PROBLEMS = 5
MAX_REPORTED = 100  # problems (and warnings) kept in the report; the rest are counted
MAX_PROBLEM_CHARS = 300  # one problem's message (a quoted value or a key in a path could be megabytes)


class DatasetError(ValueError):
    """The dataset as a whole is unusable; the message says why and what to do."""


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
            raise DatasetError(f"the gzip file decompresses to more than {self.limit} bytes: "
                               "split it into smaller files")
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


# ---------------------------------------------------------------------------- the whole file

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
        return _load(path, report, max_invalid_fraction, check, max_decompressed_bytes, max_line_bytes,
                     max_examples, max_chars)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"the gzip file is corrupt or truncated ({exc}): export and upload it again") from None


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
            _refuse_surrogates(record)
            fmt = line_format(record)
            if fmt == "brightrun":
                brightrun_lines += 1
            conversation, merged = canonical_conversation(record, fmt)
        except LineProblem as problem:
            report.problem(problem.kind, number, f"line {number}: {problem}")
            continue
        key = fingerprint(conversation)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        report.merged_messages += merged
        report.formats[fmt] += 1
        conversations.append(conversation)
        chars += sum(len(m["content"]) for m in conversation["messages"])
        _check_memory_budget(len(conversations), chars, max_examples, max_chars)
    report.examples = len(conversations)
    declared = meta.get("total_pairs")
    if isinstance(declared, int) and declared != brightrun_lines:
        report.warnings.append(f"the _meta header says total_pairs={declared} but the file holds "
                               f"{brightrun_lines} pairs")
    if check:
        check_usable(report, max_invalid_fraction)
    return conversations, report


def _meta_header(record: dict, number: int, report: Report) -> dict:
    meta = record["_meta"]
    if not isinstance(meta, dict):
        report.warnings.append(f"line {number}: `_meta` is not an object; ignored")
        return {}
    return meta


_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair from JSON decodes to one character: what is left is unpaired


def _refuse_surrogates(record: Any) -> None:
    """LineProblem when a parsed line holds an unpaired UTF-16 surrogate (UTF-8, and so the job's result, cannot
    hold it)."""
    surrogate = _surrogate_at(record)
    if surrogate:
        raise LineProblem(f"`{surrogate}` holds an unpaired UTF-16 surrogate (a character cut in half, e.g. an "
                          "emoji split by a JavaScript export): fix or remove that character")


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



def _check_memory_budget(examples: int, chars: int, max_examples: int | None, max_chars: int | None) -> None:
    """DatasetError once the conversations loaded so far are more than this worker holds in memory."""
    if max_examples is not None and examples > max_examples:
        raise DatasetError(f"the dataset holds more than {max_examples} conversations, more than this worker loads "
                           "at once (MAX_DATASET_EXAMPLES): split it into several jobs, or raise the limit on a worker "
                           "with more memory")
    if max_chars is not None and chars > max_chars:
        raise DatasetError(f"the dataset holds more than {max_chars} characters of messages, more than this worker "
                           "loads at once (MAX_DATASET_CHARS): split it into several jobs, or raise the limit on a "
                           "worker with more memory")


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
            f"{unusable} of {considered} lines cannot be used ({report.skipped} skipped, {report.invalid} invalid; "
            f"more than {max_invalid_fraction:.0%}): {quoted}{more}. Fix these lines, or raise max_invalid_fraction, "
            "and resubmit"
        )


def split_validation(conversations: list[dict], fraction: float | None,
                     seed: int) -> tuple[list[dict], list[dict], str | None]:
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


def write_jsonl(conversations: list[dict], path: str | Path) -> None:
    """The canonical JSONL, written whole or not at all (files.atomic_file)."""
    with atomic_file(Path(path), "w") as f:
        for c in conversations:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="dataset file (JSONL, JSON array, optionally gzip)")
    parser.add_argument("--output", help="write the canonical JSONL here")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--max-invalid-fraction", type=float, default=0.1,
                        help="fail when more lines than this are invalid")
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


