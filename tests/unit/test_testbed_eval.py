"""benchmarks/testbed_eval.py's statistics: best baseline per rate, paired bootstrap intervals, outputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("testbed_eval", REPO / "benchmarks" / "testbed_eval.py")
te = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = te
spec.loader.exec_module(te)


def runs(table):
    return [te.Run(p, rate, seed, attainment=a) for (p, rate, seed), a in table.items()]


def test_every_documented_baseline_and_ours_are_in_the_harness():
    from ampd_plugin.evaluation import connector_kind, split_policy_spec

    assert set(te.POLICIES) == {"ampd", "ampd*", "dynamo", "llmd", "colocated", "vllm-today"}
    assert connector_kind("vllm-today") == "mooncake" and connector_kind("colocated") == "ampd"
    assert split_policy_spec("dynamo") == ("dynamo", ["block_size=128"])  # vLLM-CPU's block size
    assert split_policy_spec("ampd*") == ("ampd", ["predictive=true", "itl_aware=true"])


def test_paired_difference_against_the_best_baseline_per_rate():
    table = {}
    for seed, (ours, a, b) in enumerate([(0.9, 0.7, 0.8), (0.85, 0.6, 0.75), (0.95, 0.7, 0.8), (0.9, 0.65, 0.8),
                                         (0.9, 0.7, 0.8)]):
        table[("ampd*", 0.5, seed)], table[("dynamo", 0.5, seed)], table[("vllm-today", 0.5, seed)] = ours, a, b
        table[("ampd*", 1.0, seed)], table[("dynamo", 1.0, seed)], table[("vllm-today", 1.0, seed)] = 0.5, 0.6, 0.4 + 0.01 * seed
    result = te.analyse(runs(table), te.OURS)
    by_rate = {p["rate"]: p for p in result["paired"]}
    assert by_rate[0.5]["best_baseline"] == "vllm-today" and by_rate[1.0]["best_baseline"] == "dynamo"
    assert by_rate[0.5]["mean_diff"] == pytest.approx(0.11)
    assert by_rate[0.5]["significant"] and 0 < by_rate[0.5]["ci_low"] <= 0.11 <= by_rate[0.5]["ci_high"]
    assert by_rate[1.0]["mean_diff"] == pytest.approx(-0.1) and by_rate[1.0]["significant"]  # worse, and it says so


def test_noisy_differences_are_not_significant():
    table = {}
    for seed, d in enumerate([0.2, -0.25, 0.15, -0.1, 0.05]):
        table[("ampd", 0.8, seed)], table[("colocated", 0.8, seed)] = 0.5 + d, 0.5
    (p,) = te.analyse(runs(table), te.OURS)["paired"]
    assert p["ci_low"] < 0 < p["ci_high"] and not p["significant"]
    assert "not a significant difference" in te.reading(p)


def test_one_seed_gives_no_interval():
    mean, lo, hi = te.bootstrap_mean_ci([0.4])
    assert (mean, lo, hi) == (0.4, None, None)


def test_failed_runs_are_left_out_and_outputs_are_written(tmp_path):
    table = {("ampd", 0.4, 0): 0.9, ("ampd", 0.4, 1): 0.8, ("llmd", 0.4, 0): 0.7, ("llmd", 0.4, 1): 0.75}
    rs = runs(table) + [te.Run("vllm-today", 0.4, 0, failure="load test wrote no report (exit 2)")]
    analysis = te.analyse(rs, te.OURS)
    assert "vllm-today" not in analysis["curves"]
    te.plot(analysis, tmp_path / "a.png", "t")
    assert (tmp_path / "a.png").stat().st_size > 1000
    md = te.summary_markdown(rs, analysis, {"mode": "quick", "started": "now", "seeds": [0, 1], "rates": [0.4],
                                            "duration_s": 10, "foreign_before": 0.0, "foreign_worst": 0.1})
    assert "ampd − llmd" in md and "load test wrote no report" in md
    single = te.analyse(runs({("ampd*", 0.8, 0): 0.6, ("colocated", 0.8, 0): 0.5}), te.OURS)["paired"][0]
    assert "single run — no interval" in te.reading(single)


def test_demo_accepts_the_new_deployments_and_rejects_unknown_ones():
    import shutil

    import click

    from ampd_plugin.demo import POLICIES, check_policy_spec

    assert POLICIES == ("ampd*", "vllm-today", "colocated")
    for spec in ("ampd*", "colocated", "dynamo", "llmd:non_cached_tokens=64"):
        check_policy_spec(spec)
    if shutil.which("vllm-router"):
        check_policy_spec("vllm-today")
    with pytest.raises(click.BadParameter, match="unknown policy 'vllm-tomorrow'"):
        check_policy_spec("vllm-tomorrow")


def test_report_only_reanalyses_a_partial_results_file(tmp_path):
    import json
    from dataclasses import asdict

    rs = runs({("ampd*", 0.8, 0): 0.7, ("ampd*", 0.8, 1): 0.8, ("vllm-today", 0.8, 0): 0.5, ("vllm-today", 0.8, 1): 0.6})
    rs[0].foreign_cores_max = 0.9
    meta = {"mode": "quick", "started": "now", "seeds": [0, 1], "rates": [0.8], "duration_s": 25, "foreign_before": 0.1}
    (tmp_path / "results.json").write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in rs]}))
    assert te.main(["--report-only", str(tmp_path / "results.json")]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "ampd* − vllm-today" in md and "0.90 cores" in md and (tmp_path / "attainment.png").exists()
    assert "too few pairs" in md  # two pairs: an interval, but no verdict
