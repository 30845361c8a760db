"""`ampd-plugin workload gen|stats` through click's runner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ampd_plugin.cli import main


def run(*args: str):
    return CliRunner().invoke(main, ["workload", *args])


def test_gen_then_stats(tmp_path):
    out = tmp_path / "tb.jsonl"
    result = run("gen", "--profile", "toolbench", "--sessions", "50", "--rate", "2", "--seed", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().count("\n") > 50
    table = run("stats", str(out))
    assert table.exit_code == 0, table.output
    assert "rounds / session" in table.output and "input tokens / round" in table.output
    summary = json.loads(run("stats", str(out), "--json").output)
    assert summary["sessions"] == 50
    assert summary["rounds"] == out.read_text().count("\n")


def test_same_seed_same_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        assert run("gen", "--profile", "gaia", "--sessions", "20", "--rate", "1", "--seed", "9",
                   "--out", str(path)).exit_code == 0
    assert a.read_text() == b.read_text()


def test_bad_values_are_click_errors(tmp_path):
    out = str(tmp_path / "x.jsonl")
    unknown = run("gen", "--profile", "sharegpt", "--sessions", "5", "--rate", "1", "--out", out)
    assert unknown.exit_code == 2
    for name in ("toolbench", "gaia", "hotpotqa", "dureader"):
        assert name in unknown.output
    zero_rate = run("gen", "--profile", "gaia", "--sessions", "5", "--rate", "0", "--out", out)
    assert zero_rate.exit_code == 2 and "--rate" in zero_rate.output
    negative_sessions = run("gen", "--profile", "gaia", "--sessions", "-1", "--rate", "1", "--out", out)
    assert negative_sessions.exit_code == 2 and "--sessions" in negative_sessions.output


def test_stats_on_malformed_trace_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"session_id": "a", "timestamp": 0, "input_length": 5, "output_length": 5}\n{oops\n')
    result = run("stats", str(path))
    assert result.exit_code == 1
    assert "line 2" in result.output and "not valid JSON" in result.output
    assert "Traceback" not in result.output
