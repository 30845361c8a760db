"""Workloads: profile means, determinism, trace round trip and malformed traces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ampd_plugin.workload import (
    PROFILES,
    Round,
    Session,
    TraceError,
    generate,
    load_workload,
    parse_trace,
    read_trace,
    write_trace,
)

PAPER_MEANS = {  # rounds, prefill (new input) tokens, decode tokens per round — AMPD paper Table 1
    "toolbench": (3.96, 703.79, 50.39),
    "gaia": (11.32, 6161.02, 528.76),
    "hotpotqa": (3, 1569.8, 80.03),
    "dureader": (3, 3081.23, 150.10),
}


@pytest.mark.parametrize("name", sorted(PAPER_MEANS))
def test_profile_means_match_the_paper(name):
    rounds_mean, input_mean, output_mean = PAPER_MEANS[name]
    sessions = generate(name, 4000, rate=5.0, seed=7)
    rounds = [r for s in sessions for r in s.rounds]
    assert np.mean([len(s.rounds) for s in sessions]) == pytest.approx(rounds_mean, rel=0.04)
    assert np.mean([r.input_tokens for r in rounds]) == pytest.approx(input_mean, rel=0.04)
    assert np.mean([r.output_tokens for r in rounds]) == pytest.approx(output_mean, rel=0.04)
    if PROFILES[name].fixed_rounds:
        assert {len(s.rounds) for s in sessions} == {3}
    else:
        assert len({len(s.rounds) for s in sessions}) > 5  # a real spread, not a constant
    # Poisson arrivals: mean gap 1/rate, first at 0, sorted.
    arrivals = np.array([s.arrival_s for s in sessions])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert np.mean(np.diff(arrivals)) == pytest.approx(1 / 5.0, rel=0.06)
    # The last round has no tool delay after it; the others do.
    assert all(s.rounds[-1].tool_delay_s == 0.0 for s in sessions)
    delays = [r.tool_delay_s for s in sessions for r in s.rounds[:-1]]
    assert np.mean(delays) == pytest.approx(PROFILES[name].mean_tool_delay_s, rel=0.06)


def test_same_seed_same_workload_and_different_seed_differs():
    a = generate("toolbench", 200, 2.0, seed=3)
    b = generate("toolbench", 200, 2.0, seed=3)
    c = generate("toolbench", 200, 2.0, seed=4)
    assert a == b
    assert a != c


def test_history_and_prompt_tokens():
    s = Session("s", 0.0, [Round(100, 10, 1.0), Round(50, 20, 0.5), Round(30, 5)])
    assert s.history_tokens(0) == 0
    assert s.history_tokens(2) == 180
    assert s.prompt_tokens(2) == 210
    assert s.total_tokens == 215


def test_trace_round_trip(tmp_path):
    sessions = generate("gaia", 50, 1.0, seed=1)
    sessions[0].rounds[0] = Round(sessions[0].rounds[0].input_tokens, 9, sessions[0].rounds[0].tool_delay_s,
                                  hash_ids=(1, 2, 3))
    path = tmp_path / "t.jsonl"
    write_trace(sessions, path)
    loaded = read_trace(path)
    assert len(loaded) == 50
    for original, back in zip(sessions, loaded):
        assert back.session_id == original.session_id
        assert back.arrival_s == pytest.approx(original.arrival_s, abs=1e-6)
        assert [(r.input_tokens, r.output_tokens, r.hash_ids) for r in back.rounds] == \
            [(r.input_tokens, r.output_tokens, r.hash_ids) for r in original.rounds]
        assert [r.tool_delay_s for r in back.rounds] == pytest.approx([r.tool_delay_s for r in original.rounds],
                                                                       abs=1e-6)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) >= {"session_id", "timestamp", "input_length", "output_length"}


def test_mooncake_style_trace_without_sessions_and_cumulative_mode():
    # Plain Mooncake: no session_id, each line is its own single-round session.
    plain = ['{"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [46, 47]}',
             '{"timestamp": 27482, "input_length": 6402, "output_length": 490}']
    sessions = parse_trace(plain)
    assert [len(s.rounds) for s in sessions] == [1, 1]
    assert sessions[1].arrival_s == pytest.approx(27.482)
    assert sessions[0].rounds[0].hash_ids == (46, 47)
    # Whole-prompt lengths per round: new tokens = prompt − previous prompt − previous output.
    lines = ['{"session_id": "a", "timestamp": 1000, "input_length": 100, "output_length": 10}',
             '{"session_id": "a", "timestamp": 3000, "input_length": 150, "output_length": 10}']
    cumulative = parse_trace(lines, input_mode="cumulative")
    assert [r.input_tokens for r in cumulative[0].rounds] == [100, 40]
    assert cumulative[0].rounds[0].tool_delay_s == pytest.approx(2.0)  # gap between send timestamps
    incremental = parse_trace(lines)
    assert [r.input_tokens for r in incremental[0].rounds] == [100, 150]
    with pytest.raises(TraceError, match="line 2: cumulative input_length 105"):
        parse_trace([lines[0], lines[1].replace("150", "105")], input_mode="cumulative")


@pytest.mark.parametrize("bad, message", [
    ('{"session_id": "a", "timestamp": 0, "input_length": 5', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"session_id": "b", "timestamp": 0, "output_length": 5}', "line 2: missing field 'input_length'"),
    ('{"session_id": "b", "timestamp": 0, "input_length": 5}', "line 2: missing field 'output_length'"),
    ('{"session_id": "b", "timestamp": 0, "input_length": -3, "output_length": 5}', "line 2: 'input_length' must be >= 1"),
    ('{"session_id": "b", "timestamp": 0, "input_length": 2.5, "output_length": 5}', "line 2: 'input_length' must be an integer"),
    ('{"session_id": "b", "timestamp": -1, "input_length": 3, "output_length": 5}', "line 2: 'timestamp' must be >= 0"),
    ('{"session_id": "b", "timestamp": 0, "input_length": 3, "output_length": 5, "hash_ids": "x"}', "line 2: 'hash_ids'"),
])
def test_malformed_trace_lines_name_the_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"session_id": "a", "timestamp": 0, "input_length": 5, "output_length": 5}\n' + bad + "\n")
    with pytest.raises(TraceError) as exc:
        read_trace(path)
    assert message in str(exc.value)
    assert str(path) in str(exc.value)


def test_aiperf_multi_turn_without_schedule_needs_a_rate(tmp_path):
    path = tmp_path / "aiperf.jsonl"
    path.write_text('{"session_id": "abc", "input_length": 300, "output_length": 40}\n'
                    '{"session_id": "abc", "delay": 2, "input_length": 150, "output_length": 20}\n'
                    '{"session_id": "abc", "input_length": 10, "output_length": 20}\n')
    (session,) = read_trace(path)
    assert not session.timed
    assert [r.tool_delay_s for r in session.rounds] == [0.002, 0.0, 0.0]
    with pytest.raises(ValueError, match="give a session rate"):
        load_workload(path)
    (retimed,) = load_workload(path, rate=1.0)
    assert retimed.timed and retimed.rounds == session.rounds


def test_empty_trace_and_unknown_input_mode(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(path)
    with pytest.raises(ValueError, match="unknown input mode"):
        parse_trace([], input_mode="whole")


def test_load_workload_profiles_and_traces(tmp_path):
    assert load_workload("hotpotqa", sessions=10, rate=1.0, seed=2) == generate("hotpotqa", 10, 1.0, seed=2)
    with pytest.raises(ValueError, match="needs a session count and a rate"):
        load_workload("hotpotqa")
    with pytest.raises(ValueError) as exc:
        load_workload("nope.jsonl")
    assert "toolbench" in str(exc.value)
    path = tmp_path / "t.jsonl"
    write_trace(generate("dureader", 20, 1.0, seed=2), path)
    assert len(load_workload(path)) == 20
    assert len(load_workload(path, sessions=5)) == 5
    retimed = load_workload(path, rate=100.0, seed=1)
    assert max(s.arrival_s for s in retimed) < 2.0  # 20 sessions at 100/s
    assert [s.rounds for s in retimed] == [s.rounds for s in read_trace(path)]


@pytest.mark.parametrize("sessions, rate", [(0, 1.0), (5, 0.0), (5, -1.0)])
def test_non_positive_sessions_or_rate(sessions, rate):
    with pytest.raises(ValueError, match="must be positive"):
        generate("toolbench", sessions, rate)
