"""`ampd-plugin plan` end to end on roofline presets (no engines): table, JSON, files, errors."""

from __future__ import annotations

import json
import subprocess

from click.testing import CliRunner

from ampd_plugin.planner.plan_cli import plan

BASE = ["--model", "Llama-3.1-70B", "--gpu", "H20", "--workload", "toolbench", "--ttft-slo", "2",
        "--itl-slo", "0.1", "--sessions", "80"]


def run(*args):
    return CliRunner().invoke(plan, [*BASE, *args], catch_exceptions=False)


def test_json_output_and_files(tmp_path):
    res = run("--gpus", "8", "--rate", "0.5", "--json", "--out", str(tmp_path), "--top", "2")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["feasible"] is True
    assert 1 <= len(data["candidates"]) <= 2
    for cand in data["candidates"]:
        assert cand["gpus"] <= 8
        assert cand["simulated"]["slo_attainment"] is not None
        assert cand["goodput"] is not None
    for script, _desc in data["written"]:
        subprocess.run(["bash", "-n", script], check=True)


def test_table_output():
    res = run("--gpus", "8", "--rate", "0.5", "--no-simulate")
    assert res.exit_code == 0, res.output
    assert "P[" in res.output and "ILP solved" in res.output


def test_deterministic_json():
    a = json.loads(run("--gpus", "16", "--rate", "1", "--json", "--no-simulate").output)
    b = json.loads(run("--gpus", "16", "--rate", "1", "--json", "--no-simulate").output)
    a.pop("solve_seconds"), b.pop("solve_seconds")
    assert a == b


def test_infeasible_model_explained():
    res = run("--gpus", "1", "--rate", "0.5", "--degrees", "1", "--json")
    assert res.exit_code == 2
    data = json.loads(res.output)
    assert data["feasible"] is False and "weights do not fit" in data["reason"]
    res = run("--gpus", "1", "--rate", "0.5", "--degrees", "1")
    assert res.exit_code == 1 and "no feasible deployment" in res.output


def test_bad_inputs():
    assert run("--gpus", "0", "--rate", "1").exit_code == 2
    assert run("--gpus", "8", "--rate", "1", "--degrees", "a,b").exit_code == 2
    res = CliRunner().invoke(plan, ["--gpus", "8", "--rate", "1", "--workload", "toolbench", "--ttft-slo", "1",
                                    "--itl-slo", "0.1"])
    assert res.exit_code != 0 and "--model" in res.output
    res = run("--gpus", "8", "--rate", "1", "--model", "nope")
    assert res.exit_code == 1 and "unknown model" in res.output
