"""Chat formats: each upload format becomes the canonical form, and a line that cannot be used names its field and
the fix. Most tests go through the loader so that the line numbers in the report are checked too."""

import pytest

from chat_formats import FORMATS, LineProblem, canonical_conversation, detect_format, fingerprint, line_format
from conftest import ROOT, chat, write
from dataset_loader import load_dataset

FIXTURES = ROOT / "tests" / "fixtures"


def test_each_format_is_detected_by_its_keys():
    records = {"openai": {"messages": []}, "sharegpt": {"conversations": []}, "turns": {"turns": []},
               "brightrun": {"target_response": "a"}, "alpaca": {"instruction": "q", "output": "a"},
               "prompt_completion": {"prompt": "q", "completion": "a"}}
    assert set(records) == set(FORMATS)
    assert {fmt: detect_format(record) for fmt, record in records.items()} == {fmt: fmt for fmt in FORMATS}
    assert detect_format({"instruction": "q"}) is None
    with pytest.raises(LineProblem, match=r"unrecognized format \(keys: foo\); expected `messages`"):
        line_format({"foo": 1})


def test_a_canonical_conversation_keeps_tools_and_the_conversation_id():
    record = chat(("user", "q"), ("assistant", "a")) | {"tools": [{"type": "function"}], "conversation_id": 3}
    conversation, merged = canonical_conversation(record, "openai")
    assert conversation == {"messages": [{"role": "user", "content": "q"},
                                         {"role": "assistant", "content": "a", "weight": 1}],
                            "tools": [{"type": "function"}], "conversation_id": "3"}
    assert merged == 0


def test_fingerprints_differ_by_weight_and_tools_and_match_for_equal_conversations():
    trained, _ = canonical_conversation(chat(("user", "q"), ("assistant", "a")), "openai")
    again, _ = canonical_conversation(chat(("user", "q"), ("assistant", "a")), "openai")
    context = {"messages": [dict(m, weight=0) if m["role"] == "assistant" else m for m in trained["messages"]]}
    assert fingerprint(trained) == fingerprint(again)
    assert fingerprint(trained) != fingerprint(context)
    assert fingerprint(trained) != fingerprint(trained | {"tools": []})


def test_every_common_format_becomes_the_canonical_form(tmp_path):
    path = write(tmp_path, [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Hello", "weight": 1}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
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


def test_the_apps_turns_format_loads_and_every_bad_line_is_named(tmp_path):
    path = write(tmp_path, [
        {"conversation_id": "c1", "turns": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
                                            {"role": "assistant", "content": "A2"}]},
        {"conversation_id": 7, "turns": [{"role": "Human", "content": "q"}, {"role": "gpt", "content": "a"}]},
        {"conversation_id": "c3", "turns": [{"role": "narrator", "content": "x"},
                                            {"role": "assistant", "content": "a"}]},
        {"conversation_id": "c4", "turns": []},
        {"conversation_id": "c5", "turns": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
        {"conversation_id": "c6", "turns": [{"role": "user", "content": "q"}]},
    ])
    conversations, report = load_dataset(path, max_invalid_fraction=1.0)
    assert report.formats == {"turns": 2} and (report.invalid, report.skipped) == (3, 1)
    assert conversations[0] == {"conversation_id": "c1", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "weight": 1},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "weight": 1}]}
    assert conversations[1]["conversation_id"] == "7"
    assert [m["role"] for m in conversations[1]["messages"]] == ["user", "assistant"]
    messages = [p["message"] for p in report.problems]
    assert messages == ["line 3: `turns[0].role` is 'narrator'; expected system, user or assistant",
                        "line 4: `turns` must be a non-empty array, got array",
                        "line 5: `turns[0].content` must be a string or a list of "
                        "{\"type\": \"text\", \"text\": ...} parts, got int",
                        "line 6: no assistant message to train on (none, empty, or all weight 0)"]


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
                        "line 4: `messages[1].tool_calls` must be an array of "
                        "{\"function\": {\"name\": ..., \"arguments\": ...}}"]


def test_sharegpt_aliases_merges_and_unknown_speakers():
    conversations, report = load_dataset(FIXTURES / "sharegpt_aliases.jsonl", max_invalid_fraction=1.0)
    assert report.examples == 2 and report.merged_messages == 1
    assert [m["role"] for m in conversations[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert conversations[1]["messages"][0] == {"role": "user", "content": "Q1\n\nQ2"}
    assert report.problems[0]["message"] == ("line 3: `conversations[0].from` is 'narrator'; "
                                             "expected human, gpt or system")


def test_alpaca_history_is_context_and_empty_output_is_skipped():
    conversations, report = load_dataset(FIXTURES / "alpaca_history.jsonl", max_invalid_fraction=1.0)
    assert [(m["role"], m.get("weight")) for m in conversations[0]["messages"]] == [
        ("user", None), ("assistant", 0), ("user", None), ("assistant", 1)]
    assert conversations[0]["messages"][2]["content"] == "And in euros?"
    assert report.skipped == 1 and "`output` is empty" in report.problems[0]["message"]


def test_a_system_message_after_the_first_is_an_error(tmp_path):
    path = write(tmp_path, [chat(("user", "q"), ("system", "late"), ("assistant", "a"))])
    _, report = load_dataset(path, check=False)
    assert report.problems == [
        {"line": 1, "message": "line 1: message 1 is a system message; a system message may only come first"}]


def test_only_weight_zero_assistants_is_skipped(tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "weight": 0}]}])
    _, report = load_dataset(path, check=False)
    assert report.skipped == 1 and "no assistant message to train on" in report.problems[0]["message"]
