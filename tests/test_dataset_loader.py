"""The loader: the real BrightRun sample, reading the file (gzip, arrays, odd bytes), a report that names each bad
line, the CLI; the bounds (line length, memory budget, a report of bounded size, however odd or huge the line); the
validation split, of whole conversations. The formats themselves: test_chat_formats.py."""

import gzip
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handler
from chat_formats import detect_format
from conftest import ROOT, SAMPLE, chat, growth, write
from dataset_loader import DatasetError, load_dataset, split_validation, write_jsonl


def test_the_real_brightrun_sample_loads_without_doubled_user_turns():
    conversations, report = load_dataset(SAMPLE)
    assert report.examples == 44 and report.formats == {"brightrun": 44} and report.invalid == 0
    assert any("total_pairs=89" in w and "44" in w for w in report.warnings)
    raw = [json.loads(line) for line in SAMPLE.read_text().splitlines()[1:]]
    for conv, pair in zip(conversations, raw):
        roles = [m["role"] for m in conv["messages"]]
        assert roles[:3] == ["system", "user", "assistant"]
        assert all(a != b for a, b in zip(roles, roles[1:])), roles  # no doubled turn of any role
        assert [m["content"] for m in conv["messages"] if m["role"] == "user"].count(pair["current_user_input"]) == 1
        trained = [m for m in conv["messages"] if m["role"] == "assistant" and m["weight"] == 1]
        assert [m["content"] for m in trained] == [pair["target_response"]]
        assert "emotional_state" not in json.dumps(conv) and "intensity" not in json.dumps(conv)
        assert conv["conversation_id"] == pair["conversation_id"]  # pairs of one conversation stay groupable
    assert len({c["conversation_id"] for c in conversations}) == 12


def test_bad_lines_are_named_with_the_field_and_the_fix(tmp_path):
    good = chat(("user", "q"), ("assistant", "a"))
    lines = [good] * 1 + [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(20)] + [
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        '{"messages": [{"role": "user", "content": NaN}]}',
        "",
        {"id": "x", "conversation_history": [], "current_user_input": "q", "target_response": None},
    ]
    _, report = load_dataset(write(tmp_path, lines), max_invalid_fraction=0.2)  # 3 of 24 cannot be used
    messages = {p["line"]: p["message"] for p in report.problems}
    assert messages[22] == "line 22: `messages[1].role` is 'bot'; expected system, user, assistant or tool"
    assert "line 23: not valid JSON" in messages[23] and "NaN" in messages[23]
    assert "line 25: `target_response` is empty" in messages[25]
    assert (report.examples, report.invalid, report.skipped, report.blank_lines) == (21, 2, 1, 1)


def test_a_mostly_invalid_file_fails_quoting_the_first_problems(tmp_path):
    lines = [chat(("user", "q"), ("assistant", "a")), {"foo": 1}, {"foo": 2}]
    with pytest.raises(DatasetError, match=r"2 of 3 lines cannot be used \(0 skipped, 2 invalid; "
                                           r".*line 2: unrecognized format \(keys: foo\)"):
        load_dataset(write(tmp_path, lines))


def test_empty_and_non_utf8_files_say_which(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="line 1 is not UTF-8"):
        load_dataset(latin)


def test_gzip_bom_crlf_and_json_arrays_are_read(tmp_path):
    conv = chat(("user", "q"), ("assistant", "a"))
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(("\ufeff" + json.dumps(conv) + "\r\n").encode()))
    conversations, report = load_dataset(gz)
    assert conversations == [{"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a", "weight": 1}]}]
    assert any("byte order mark" in w for w in report.warnings)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([conv, conv]))
    conversations, report = load_dataset(array)
    assert len(conversations) == 1 and report.duplicates == 1


def test_cli_json_report_and_exit_codes(tmp_path):
    out = tmp_path / "canon.jsonl"
    run = subprocess.run([sys.executable, "dataset_loader.py", str(SAMPLE), "--json", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {k: report[k] for k in ("examples", "skipped", "invalid", "duplicates", "formats")} == {
        "examples": 44, "skipped": 0, "invalid": 0, "duplicates": 0, "formats": {"brightrun": 44}}
    again, _ = load_dataset(out)  # the canonical output loads back to the same conversations
    assert again == load_dataset(SAMPLE)[0]
    bad = write(tmp_path, [{"foo": 1}], "bad.jsonl")
    run = subprocess.run([sys.executable, "dataset_loader.py", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "no usable example" in run.stderr


# ---------------------------------------------------------------------------- reading lines

def test_lines_split_on_newline_only_so_u2028_is_text(tmp_path):
    path = tmp_path / "d.jsonl"
    line = json.dumps(chat(("user", "a\u2028b"), ("assistant", "c\u2029d")), ensure_ascii=False)
    path.write_text(line + "\n", encoding="utf-8")
    conversations, report = load_dataset(path)
    assert report.examples == 1 and conversations[0]["messages"][0]["content"] == "a\u2028b"


def test_infinity_is_rejected_naming_the_line(tmp_path):
    path = write(tmp_path, ['{"prompt": "q", "completion": "a", "score": Infinity}'])
    _, report = load_dataset(path, check=False)
    assert report.invalid == 1 and "Infinity is not valid JSON" in report.problems[0]["message"]


def test_a_gzip_bomb_is_stopped_at_the_cap(tmp_path):
    bomb = tmp_path / "bomb.jsonl.gz"
    bomb.write_bytes(gzip.compress(b" " * 5_000_000 + b"\n"))
    with pytest.raises(DatasetError, match="decompresses to more than 1000000 bytes"):
        load_dataset(bomb, max_decompressed_bytes=1_000_000)


def test_jsonl_whose_first_line_is_an_array_is_still_jsonl(tmp_path):
    path = write(tmp_path, [[1, 2], chat(("user", "q"), ("assistant", "a"))])
    conversations, report = load_dataset(path, check=False)
    assert report.examples == 1
    assert report.problems == [{"line": 1, "message": "line 1: expected a JSON object, got array"}]


def test_cli_prints_the_report_even_when_the_dataset_is_unusable(tmp_path):
    bad = write(tmp_path, [{"foo": 1}, chat(("user", "q"), ("assistant", "a"))], "bad.jsonl")
    run = subprocess.run([sys.executable, "dataset_loader.py", str(bad), "--json"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and "1 of 2 lines cannot be used" in run.stderr
    assert json.loads(run.stdout)["invalid"] == 1


# ---------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["messages", "conversations", "role", "content", "weight", "from", "value", "instruction",
                        "input", "output", "prompt", "completion", "target_response", "current_user_input",
                        "conversation_history", "system_prompt", "history", "tools", "tool_calls", "name", "_meta",
                        "system"])
roles = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot"])
shaped = st.recursive(json_values | roles, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(keys, children, max_size=5), max_leaves=16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(shaped, min_size=1, max_size=6))
def test_any_json_line_becomes_an_example_or_a_numbered_problem(tmp_path, values):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8")
    _, report = load_dataset(path, check=False)
    headers = sum(1 for v in values if isinstance(v, dict) and "_meta" in v and detect_format(v) is None)
    if isinstance(values[0], list) and report.warnings and "one JSON array" in report.warnings[0]:
        return  # a single line holding an array is read as a whole-file array: its items are counted instead
    assert report.examples + report.skipped + report.invalid + report.duplicates + headers == len(values)
    assert all(1 <= p["line"] <= len(values) and p["message"].startswith(f"line {p['line']}: ")
               for p in report.problems)


text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())
conversation = st.builds(
    lambda system, turns: {"messages": ([{"role": "system", "content": system}] if system else [])
                           + [m for u, a, w in turns for m in ({"role": "user", "content": u},
                                                                {"role": "assistant", "content": a, "weight": w})]},
    st.none() | text, st.lists(st.tuples(text, text, st.sampled_from([0, 1])), min_size=1, max_size=3),
).filter(lambda c: any(m.get("weight") == 1 for m in c["messages"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(conversation, min_size=1, max_size=5))
def test_canonical_output_loads_back_to_the_same_conversations(tmp_path, conversations):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    first, _ = load_dataset(source, check=False)
    write_jsonl(first, tmp_path / "out.jsonl")
    again, report = load_dataset(tmp_path / "out.jsonl", check=False)
    assert again == first and report.merged_messages == 0 and report.invalid == 0


def test_a_truncated_gzip_and_absurd_nesting_are_named_not_crashes(tmp_path):
    whole = gzip.compress((json.dumps(chat(("user", "q"), ("assistant", "a"))) + "\n").encode() * 200)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="the gzip file is corrupt or truncated"):
        load_dataset(cut)
    deep = write(tmp_path, [chat(("user", "q"), ("assistant", "a")), "[" * 100_000], "deep.jsonl")
    _, report = load_dataset(deep, check=False)
    assert report.problems == [{"line": 2, "message": "line 2: nested too deeply to read"}]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_a_lone_surrogate_is_an_invalid_line_not_a_result_the_sdk_cannot_send(tmp_path):
    """JSON "\\ud800" escapes (an emoji cut in half by a JavaScript export) decode to a string UTF-8 cannot encode."""
    lines = [GOOD] * 20 + ['{"messages": [{"role": "user", "content": "q"}, '
                           '{"role": "assistant", "content": "half \\ud83d"}]}',
                           '{"\\ud800": 1}']
    conversations, report = load_dataset(write_lines(tmp_path / "d.jsonl", lines))
    assert report.invalid == 2 and report.examples == 1  # the 20 good lines are duplicates of one
    assert [p["line"] for p in report.problems] == [21, 22]
    assert ("unpaired UTF-16 surrogate" in report.problems[0]["message"]
            and "messages[1].content" in report.problems[0]["message"])
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # sendable
    write_jsonl(conversations, tmp_path / "canonical.jsonl")
    assert not list(tmp_path.glob("*.part"))


def test_a_line_with_a_huge_role_is_reported_briefly_at_a_cost_in_proportion_to_its_size(tmp_path):
    """A 100k-character role took 52 s through the handler: the message quoting it was scrubbed quadratically."""
    def reported(role_chars: int):
        huge = {"messages": [{"role": "a" * role_chars, "content": "q"}, {"role": "assistant", "content": "a"}]}
        _, report = load_dataset(write_lines(tmp_path / f"d{role_chars}.jsonl", [GOOD] * 20 + [huge]))
        return report, handler.redact_text(str(report.to_dict()), handler.MAX_MESSAGE_CHARS)

    assert growth(reported, 10_000, 100_000, runs=3) < 30  # ten times the role: ~10x linear, ~100x quadratic
    report, shown = reported(100_000)
    message = report.problems[0]["message"]
    assert report.invalid == 1 and report.problems[0]["line"] == 21 and "role" in message and len(message) < 500
    assert len(shown) <= handler.MAX_MESSAGE_CHARS


def test_the_report_keeps_every_count_but_bounded_lists_and_skipped_lines_count_in_the_policy(tmp_path):
    skipped = [{"prompt": f"p{i}", "completion": ""} for i in range(20_000)]
    with pytest.raises(DatasetError, match=r"20000 of 20001 lines cannot be used \(20000 skipped, 0 invalid"):
        load_dataset(write_lines(tmp_path / "d.jsonl", [GOOD] + skipped))
    many = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20_000)] + skipped[:1500] + ["{"] * 500
    _, report = load_dataset(write_lines(tmp_path / "e.jsonl", many), max_invalid_fraction=0.1)
    data = report.to_dict()
    assert (data["skipped"], data["invalid"]) == (1500, 500) and len(data["problems"]) <= 100
    assert data["problems_left_out"] == 2000 - len(data["problems"])
    assert len(json.dumps(data)) < 50_000


def test_an_array_file_holds_its_items_to_the_line_limit(tmp_path):
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD] * 30 + [big]))
    _, report = load_dataset(path, max_line_bytes=1000, max_invalid_fraction=0.5)
    assert report.invalid == 1 and report.problems[0]["line"] == 31
    assert "longer than 1000 bytes" in report.problems[0]["message"]


def test_a_dataset_larger_than_the_memory_budget_fails_early_saying_what_to_do(tmp_path):
    lines = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3000)]
    with pytest.raises(DatasetError, match=r"more than 1000 conversations.*MAX_DATASET_EXAMPLES"):
        load_dataset(write_lines(tmp_path / "d.jsonl", lines), max_examples=1000)
    with pytest.raises(DatasetError, match=r"more than 20000 characters of messages.*MAX_DATASET_CHARS"):
        load_dataset(write_lines(tmp_path / "d.jsonl", lines), max_chars=20_000)


def test_a_huge_single_line_is_reported_not_loaded(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a"}]}) + "\n")
        f.write(json.dumps({"prompt": "x" * 3_000_000, "completion": "y"}) + "\n")
    conversations, report = load_dataset(path, check=False, max_line_bytes=1_000_000)
    assert len(conversations) == 1 and report.invalid == 1
    assert report.problems[0]["message"].startswith("line 2: the line is longer than 1000000 bytes")


def test_the_default_validation_split_holds_out_whole_conversations():
    conversations, _ = load_dataset(SAMPLE)  # 44 BrightRun pairs of 12 conversations
    for seed in range(20):
        for fraction in (None, 0.25, 0.5):
            train_part, held_out, warning = split_validation(conversations, fraction, seed)
            trained_ids = {c["conversation_id"] for c in train_part}
            held_ids = {c["conversation_id"] for c in held_out}
            assert not trained_ids & held_ids and warning is None  # no pair of a held-out conversation is trained
            assert len(train_part) + len(held_out) == 44
            assert len(held_ids) == {None: 1, 0.25: 3, 0.5: 6}[fraction]
    assert split_validation(conversations, 0, 1)[1] == []
    small, held_out, warning = split_validation(conversations[:9], None, 1)  # the first 2 conversations' pairs
    assert held_out == [] and len(small) == 9 and "fewer than the 10 needed" in warning and "val_fraction" in warning
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
             for i in range(30)]
    assert len(split_validation(lines, None, 1)[1]) == 3  # no conversation_id: each line is a conversation
