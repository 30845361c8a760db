"""`ampd-plugin simulate`: JSON output and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ampd_plugin.cli import main

BASE = ["simulate", "--workload", "hotpotqa", "--model", "Llama-3.1-70B", "--gpu", "H20", "--prefill", "1x4",
        "--decode", "1x4", "--rate", "0.5", "--sessions", "20", "--seed", "1", "--ttft-slo", "2", "--itl-slo", "0.05"]


def invoke(*extra):
    return CliRunner().invoke(main, BASE + list(extra))


def test_json_is_one_object_with_the_summary_keys():
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)  # exactly one JSON document
    for key in ("slo_attainment", "session_attainment", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95",
                "local_fraction", "kv_bytes_moved", "rounds", "policy", "deployment"):
        assert key in out
    assert out["rounds"] == 60 and out["policy"] == "ampd" and out["deployment"]["gpus"] == 8


def test_json_is_deterministic_except_wall_time():
    a, b = json.loads(invoke("--json").output), json.loads(invoke("--json").output)
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


def test_table_output():
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "SLO attainment" in result.output


def test_policy_parameters_pass_through():
    result = invoke("--json", "--policy", "threshold", "-o", "max_local_tokens=100000")
    assert json.loads(result.output)["local_fraction"] == 1.0


def test_trace_file_workload(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"session_id": "a", "timestamp": 0, "input_length": 500, "output_length": 20}\n'
                     '{"session_id": "a", "delay": 100, "input_length": 50, "output_length": 20}\n')
    args = [a for a in BASE if a not in ("--sessions", "20")]
    args[args.index("hotpotqa")] = str(trace)
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rounds"] == 2


@pytest.mark.parametrize("extra,message", [
    (["--prefill", "2y4"], "bad pool '2y4'"),
    (["--decode", "x"], "bad pool 'x'"),
    (["--policy", "fastest"], "known policies: ampd, colocated, disagg, dynamo, llmd, threshold"),
    (["--rate", "0"], "0.0 is not in the range x>0"),
    (["--ttft-slo", "-1"], "not in the range x>0"),
    (["--itl-slo", "0"], "not in the range x>0"),
    (["--gpu", "B300"], "unknown GPU 'B300'; known GPUs: H20"),
    (["--model", "Llama-9"], "unknown model 'Llama-9': not a preset (Llama-3.1-70B"),
    (["-o", "gamma=1"], "does not accept parameter(s) gamma"),
    (["-o", "alpha"], "expected KEY=VALUE"),
    (["--prefill", "1", "--decode", "1"], "cannot hold the model weights"),
    (["--workload", "/no/such.jsonl"], "no such trace file"),
])
def test_bad_input_fails_clearly(extra, message):
    result = invoke(*extra)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_malformed_trace_names_the_line(tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"session_id": "a", "timestamp": 0, "input_length": 5, "output_length": 2}\n{"oops": 1}\n')
    args = list(BASE)
    args[args.index("hotpotqa")] = str(trace)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "line 2" in result.output
