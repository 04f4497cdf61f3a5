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
    _, report = load_dataset(write(tmp_path, lines))
    messages = {p["line"]: p["message"] for p in report.problems}
    assert messages[22] == "line 22: `messages[1].role` is 'bot'; expected system, user, assistant or tool"
    assert "line 23: not valid JSON" in messages[23] and "NaN" in messages[23]
    assert "line 25: `target_response` is empty" in messages[25]
    assert (report.examples, report.invalid, report.skipped, report.blank_lines) == (21, 2, 1, 1)


def test_a_mostly_invalid_file_fails_quoting_the_first_problems(tmp_path):
    lines = [chat(("user", "q"), ("assistant", "a")), {"foo": 1}, {"foo": 2}]
    with pytest.raises(DatasetError, match=r"2 of 3 lines are invalid .*line 2: unrecognized format \(keys: foo\)"):
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
