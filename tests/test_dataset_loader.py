"""The loader: the real BrightRun sample, every format, and a report that names each bad line."""

import gzip
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE
from dataset_loader import DatasetError, load_dataset


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_the_real_brightrun_sample_loads_without_doubled_user_turns():
    conversations, report = load_dataset(SAMPLE)
    assert report.examples == 44 and report.formats == {"brightrun": 44} and report.invalid == 0
    assert any("total_pairs=89" in w and "44" in w for w in report.warnings)
    raw = [json.loads(l) for l in SAMPLE.read_text().splitlines()[1:]]
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


def test_every_common_format_becomes_the_canonical_form(tmp_path):
    path = write(tmp_path, [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Hello", "weight": 1}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"},
        {"prompt": "2+2?", "completion": "4"},
    ])
    conversations, report = load_dataset(path)
    assert report.formats == {"openai": 1, "sharegpt": 1, "alpaca": 1, "prompt_completion": 1}
    assert conversations[0]["messages"][0] == {"role": "user", "content": "Hi there"}
    assert conversations[1]["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A", "weight": 1}]
    assert conversations[2]["messages"][1] == {"role": "user", "content": "Translate\n\nchat"}
    assert conversations[3]["messages"][-1] == {"role": "assistant", "content": "4", "weight": 1}


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
    with pytest.raises(DatasetError, match=r"2 of 3 lines cannot be used \(0 skipped, 2 invalid; .*line 2: unrecognized format \(keys: foo\)"):
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
    assert conversations == [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}]
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


# ---------------------------------------------------------------------------- fixture files per format

FIXTURES = ROOT / "tests" / "fixtures"


def test_brightrun_v5_header_history_weights_and_null_targets():
    conversations, report = load_dataset(FIXTURES / "brightrun_v5.jsonl", max_invalid_fraction=1.0)
    assert report.formats == {"brightrun": 2} and report.skipped == 1
    assert report.problems == [{"line": 4, "message": "line 4: `target_response` is empty: nothing to train on"}]
    assert not any("total_pairs" in w for w in report.warnings)  # 3 pairs declared, 3 in the file
    assert conversations[0]["messages"] == [
        {"role": "system", "content": "You are Elena, a planner."},
        {"role": "user", "content": "I am behind on savings."},  # empty history: current_user_input is added
        {"role": "assistant", "content": "That is more common than you think.", "weight": 1}]
    assert [(m["role"], m.get("weight")) for m in conversations[1]["messages"]] == [
        ("system", None), ("user", None), ("assistant", 0), ("user", None), ("assistant", 1)]


def test_openai_tools_names_and_weights(tmp_path):
    conversations, report = load_dataset(FIXTURES / "openai_tools.jsonl", max_invalid_fraction=1.0)
    assert report.examples == 2 and report.invalid == 2
    first = conversations[0]
    assert first["tools"][0]["function"]["name"] == "get_rate"
    assert first["messages"][1]["name"] == "marcus"
    assert first["messages"][2]["tool_calls"][0]["function"]["name"] == "get_rate"
    assert first["messages"][3] == {"role": "tool", "content": "6.1%", "tool_call_id": "call_1"}
    assert [m.get("weight") for m in conversations[1]["messages"]] == [None, 0, None, 1]
    messages = [p["message"] for p in report.problems]
    assert messages == ["line 3: `messages[1].weight` is 0.5; expected 0 or 1",
                        "line 4: `messages[1].tool_calls` must be an array of {\"function\": {\"name\": ..., \"arguments\": ...}}"]


def test_sharegpt_aliases_merges_and_unknown_speakers():
    conversations, report = load_dataset(FIXTURES / "sharegpt_aliases.jsonl", max_invalid_fraction=1.0)
    assert report.examples == 2 and report.merged_messages == 1
    assert [m["role"] for m in conversations[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert conversations[1]["messages"][0] == {"role": "user", "content": "Q1\n\nQ2"}
    assert report.problems[0]["message"] == "line 3: `conversations[0].from` is 'narrator'; expected human, gpt or system"


def test_alpaca_history_is_context_and_empty_output_is_skipped():
    conversations, report = load_dataset(FIXTURES / "alpaca_history.jsonl", max_invalid_fraction=1.0)
    assert [(m["role"], m.get("weight")) for m in conversations[0]["messages"]] == [
        ("user", None), ("assistant", 0), ("user", None), ("assistant", 1)]
    assert conversations[0]["messages"][2]["content"] == "And in euros?"
    assert report.skipped == 1 and "`output` is empty" in report.problems[0]["message"]


def test_a_system_message_after_the_first_is_an_error(tmp_path):
    path = write(tmp_path, [chat(("user", "q"), ("system", "late"), ("assistant", "a"))])
    _, report = load_dataset(path, check=False)
    assert report.problems == [{"line": 1, "message": "line 1: message 1 is a system message; a system message may only come first"}]


def test_only_weight_zero_assistants_is_skipped(tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}])
    _, report = load_dataset(path, check=False)
    assert report.skipped == 1 and "no assistant message to train on" in report.problems[0]["message"]


def test_lines_split_on_newline_only_so_u2028_is_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat(("user", "a\u2028b"), ("assistant", "c\u2029d")), ensure_ascii=False) + "\n", encoding="utf-8")
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
    assert report.examples == 1 and report.problems == [{"line": 1, "message": "line 1: expected a JSON object, got array"}]


def test_cli_prints_the_report_even_when_the_dataset_is_unusable(tmp_path):
    bad = write(tmp_path, [{"foo": 1}, chat(("user", "q"), ("assistant", "a"))], "bad.jsonl")
    run = subprocess.run([sys.executable, "dataset_loader.py", str(bad), "--json"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "1 of 2 lines cannot be used" in run.stderr
    assert json.loads(run.stdout)["invalid"] == 1


# ---------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dataset_loader import detect_format, write_jsonl  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["messages", "conversations", "role", "content", "weight", "from", "value", "instruction", "input",
                        "output", "prompt", "completion", "target_response", "current_user_input", "conversation_history",
                        "system_prompt", "history", "tools", "tool_calls", "name", "_meta", "system"])
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
    assert all(1 <= p["line"] <= len(values) and p["message"].startswith(f"line {p['line']}: ") for p in report.problems)


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


def test_the_apps_turns_format_loads_and_every_bad_line_is_named(tmp_path):
    path = write(tmp_path, [
        {"conversation_id": "c1", "turns": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
                                            {"role": "assistant", "content": "A2"}]},
        {"conversation_id": 7, "turns": [{"role": "Human", "content": "q"}, {"role": "gpt", "content": "a"}]},
        {"conversation_id": "c3", "turns": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "a"}]},
        {"conversation_id": "c4", "turns": []},
        {"conversation_id": "c5", "turns": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"conversation_id": "c6", "turns": [{"role": "user", "content": "q"}]},
    ])
    conversations, report = load_dataset(path, max_invalid_fraction=1.0)
    assert report.formats == {"turns": 2} and (report.invalid, report.skipped) == (3, 1)
    assert conversations[0] == {"conversation_id": "c1", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "weight": 1},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 1}]}
    assert conversations[1]["conversation_id"] == "7" and [m["role"] for m in conversations[1]["messages"]] == ["user", "assistant"]
    messages = [p["message"] for p in report.problems]
    assert messages == ["line 3: `turns[0].role` is 'narrator'; expected system, user or assistant",
                        "line 4: `turns` must be a non-empty array, got array",
                        "line 5: `turns[0].content` must be a string or a list of {\"type\": \"text\", \"text\": ...} parts, got int",
                        "line 6: no assistant message to train on (none, empty, or all weight 0)"]
