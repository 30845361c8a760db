"""The coding-agent profile and the AIPerf multi-turn / Qwen-Bailian trace readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ampd_plugin.workload import (
    PROFILES,
    Round,
    TraceError,
    generate,
    load_workload,
    parse_aiperf_multi_turn,
    parse_bailian,
    read_trace,
    sniff_format,
    workload_stats,
)


def lines(*records):
    return [json.dumps(r) + "\n" for r in records]


# ------------------------------------------------------------------------------------ coding agent
def test_coding_agent_profile_shape():
    sessions = generate("coding-agent", 3000, rate=2.0, seed=5)
    stats = workload_stats(sessions)
    assert stats["rounds_per_session"]["mean"] == pytest.approx(20, rel=0.05)
    assert 10 <= stats["rounds_per_session"]["p50"] <= 25
    assert stats["final_context_tokens"]["p50"] > 15_000  # histories of tens of thousands of tokens
    rounds = [r for s in sessions for r in s.rounds[1:]]
    firsts = [s.rounds[0].input_tokens for s in sessions]
    assert np.mean(firsts) > 3 * np.mean([r.input_tokens for r in rounds])  # long first prompt, short increments
    delays = np.array([r.tool_delay_s for s in sessions for r in s.rounds[:-1]])
    assert np.mean(delays) == pytest.approx(PROFILES["coding-agent"].mean_tool_delay_s, rel=0.1)
    assert np.percentile(delays, 99) > 5 * np.median(delays)  # bursty: a heavy tail
    assert load_workload("coding-agent", 5, 1.0) == generate("coding-agent", 5, 1.0)


# --------------------------------------------------------------------------------- AIPerf multi-turn
def test_aiperf_multi_turn_with_lengths_delays_and_system_prompt():
    out = parse_aiperf_multi_turn(lines(
        {"session_id": "b", "turns": [{"input_length": 50, "output_length": 5, "timestamp": 2000},
                                      {"input_length": 20, "output_length": 6, "timestamp": 2500}]},
        {"session_id": "a", "turns": [{"role": "system", "text": "one two three"},
                                      {"text": "hello there general", "output_length": 7, "delay": 100},
                                      {"texts": ["a b", "c"], "delay": 1500}]},
    ))
    a, b = out
    assert (a.session_id, a.arrival_s, a.timed) == ("a", 0.1, True)
    # system (3 words → 4 tokens) hoisted into the first turn (3 words → 4 tokens); default output 128
    assert a.rounds == [Round(8, 7, 1.5), Round(4, 128, 0.0)]
    assert (b.arrival_s, b.rounds) == (2.0, [Round(50, 5, 0.5), Round(20, 6, 0.0)])


def test_aiperf_untimed_conversations_need_a_rate(tmp_path):
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(lines({"session_id": "x", "turns": [{"text": "hi"}, {"text": "again"}]})))
    assert sniff_format(path.read_text().splitlines()[0]) == "aiperf-multi-turn"
    assert not read_trace(path)[0].timed
    with pytest.raises(ValueError, match="give a session rate"):
        load_workload(path)
    assert len(load_workload(path, rate=1.0)[0].rounds) == 2


@pytest.mark.parametrize("record,message", [
    ({"session_id": "x", "turns": []}, "line 2: 'turns' must be a non-empty list"),
    ({"session_id": "x", "turns": [{"output_length": 3}]}, "line 2, turn 1: a turn needs 'input_length'"),
    ({"session_id": "x", "turns": [{"text": "a", "delay": -5}]}, "line 2, turn 1: 'delay' must be >= 0"),
    ({"session_id": "x", "turns": [{"text": "a", "timestamp": 9}, {"text": "b", "timestamp": 3}]},
     "line 2, turn 2: timestamp 3"),
    ({"session_id": "x", "turns": [{"input_length": 2.5}]}, "'input_length' must be an integer"),
])
def test_aiperf_bad_lines_name_the_line(record, message):
    good = {"session_id": "ok", "turns": [{"text": "fine"}]}
    with pytest.raises(TraceError, match=message.replace("(", r"\(")):
        parse_aiperf_multi_turn(lines(good, record), source="f.jsonl")


def test_aiperf_not_json_names_the_line():
    with pytest.raises(TraceError, match="f.jsonl: line 1: not valid JSON"):
        parse_aiperf_multi_turn(["{nope\n"], source="f.jsonl")


# ----------------------------------------------------------------------------------------- Bailian
BAILIAN = [
    {"chat_id": 10, "parent_chat_id": -1, "timestamp": 100.0, "input_length": 500, "output_length": 40, "turn": 1},
    {"chat_id": 11, "parent_chat_id": -1, "timestamp": 100.5, "input_length": 300, "output_length": 10, "turn": 1},
    {"chat_id": 12, "parent_chat_id": 10, "timestamp": 103.0, "input_length": 640, "output_length": 30, "turn": 2},
    {"chat_id": 13, "parent_chat_id": 12, "timestamp": 110.0, "input_length": 700, "output_length": 20, "turn": 3},
]


def test_bailian_chains_cumulative_prompts_into_rounds(tmp_path):
    path = tmp_path / "bailian.jsonl"
    path.write_text("".join(lines(*BAILIAN)))
    a, b = read_trace(path)
    assert (a.session_id, a.arrival_s) == ("chat-10", 0.0)
    assert a.rounds == [Round(500, 40, 3.0), Round(100, 30, 7.0), Round(30, 20, 0.0)]  # 640-500-40, 700-640-30
    assert (b.session_id, b.arrival_s, b.rounds) == ("chat-11", 0.5, [Round(300, 10, 0.0)])
    assert a.prompt_tokens(2) == 700  # the trace's whole prompt is recovered
    inc = parse_bailian(lines(*BAILIAN), input_mode="incremental")
    assert [r.input_tokens for r in inc[0].rounds] == [500, 640, 700]


@pytest.mark.parametrize("index,change,message", [
    (2, {"parent_chat_id": 99}, "line 3: parent_chat_id 99 of chat 12 was not seen before it"),
    (2, {"turn": 3}, "line 3: chat 12 has turn 3, its parent turn 1"),
    (2, {"timestamp": 50.0}, "line 3: timestamp 50.0 is earlier"),
    (2, {"input_length": 520}, "line 3: input_length 520 does not exceed the parent's prompt plus output"),
    (3, {"parent_chat_id": 10}, "line 4: chat 13 continues chat 10, which already has a continuation"),
    (1, {"chat_id": 10}, "line 2: chat_id 10 appears twice"),
    (0, {"timestamp": "soon"}, "line 1: 'timestamp' must be a number of seconds"),
    (0, {"parent_chat_id": "none"}, "line 1: 'parent_chat_id' must be an integer"),
    (1, {"output_length": 0}, "line 2: 'output_length' must be >= 1"),
])
def test_bailian_bad_rows_name_the_line(index, change, message):
    rows = [dict(r) for r in BAILIAN]
    rows[index].update(change)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_bailian(lines(*rows), source="b.jsonl")


def test_mooncake_files_still_read_as_before(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(lines({"session_id": "s", "timestamp": 0, "input_length": 10, "output_length": 2},
                                  {"session_id": "s", "delay": 500, "input_length": 5, "output_length": 3})))
    assert sniff_format(path.read_text().splitlines()[0]) == "mooncake"
    assert read_trace(path)[0].rounds == [Round(10, 2, 0.5), Round(5, 3, 0.0)]
