"""Simulator invariants on hand-built workloads with the linear fake cost model."""

from __future__ import annotations

import pytest

from ampd_plugin.planner.serving import ServingTerms
from ampd_plugin.planner.simulate import Deployment, Pool, parse_pool, simulate
from ampd_plugin.costmodel import Layout
from ampd_plugin.workload import Round, Session, generate

from policy_fakes import FakeCost

SLO = dict(ttft_slo=2.0, itl_slo=0.1)
ENGINE_ONLY = ServingTerms(router_s=0.0, remote_s=0.0, export_s=0.0, frontend_s=0.0)  # no serving-path costs


def session(sid, arrival, *rounds):
    return Session(sid, arrival, [Round(i, o, d) for i, o, d in rounds])


def run(dep, sessions, policy="ampd", cost=None, **kw):
    return simulate(Deployment.parse(*dep), sessions, policy, cost or FakeCost(), **{**SLO, **kw})


def test_parse_pool():
    assert parse_pool("3") == Pool(3, Layout(1))
    assert parse_pool("2x4") == Pool(2, Layout(4))
    assert parse_pool(" 1X8 ") == Pool(1, Layout(8))
    for bad in ("", "x4", "2x", "-1", "2x0", "a", "2x4x"):
        with pytest.raises(ValueError, match="bad pool"):
            parse_pool(bad)


@pytest.mark.parametrize("policy,dep", [("ampd", ("2", "2")), ("disagg", ("2", "2")),
                                        ("colocated", ("0", "3")), ("threshold", ("1x2", "2"))])
def test_every_round_completes_exactly_once(policy, dep):
    sessions = generate("toolbench", 60, rate=3.0, seed=3)
    result = run(dep, sessions, policy, cost=FakeCost(hist_per_token=0.0))
    keys = [(r.session_id, r.round_index) for r in result.records]
    expected = [(s.session_id, k) for s in sessions for k in range(len(s.rounds))]
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == set(expected)
    assert all(r.error is None for r in result.records)
    tp = {"p": Deployment.parse(*dep).prefill.layout.tp, "d": Deployment.parse(*dep).decode.layout.tp}
    for r in result.records:
        # TTFT covers at least the prefill itself (history costs nothing with this cost model)
        assert r.ttft >= 0.001 * r.input_tokens / tp[r.worker[0]] - 1e-12
        assert r.route in ("local", "remote")


def test_same_seed_same_result_and_seed_matters():
    sessions = generate("toolbench", 80, rate=8.0, seed=5)
    a = run(("4", "2"), sessions, seed=1)
    b = run(("4", "2"), sessions, seed=1)
    c = run(("4", "2"), sessions, seed=2)
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    assert a.counters == b.counters
    assert [r.worker for r in a.records] != [r.worker for r in c.records]


def test_zero_load_latencies_equal_the_cost_model():
    cost = FakeCost(step=0.02)
    s = session("s", 1.0, (1000, 11, 5.0), (300, 6, 0.0))
    result = run(("1x2", "1"), [s], "disagg", cost=cost, serving=ENGINE_ONLY)
    r0, r1 = result.records
    lp, ld = Layout(2), Layout(1)
    # round 0: compute 1000 tokens on P (TP2), D reads 1000 tokens of KV, then computes the last position
    assert r0.ttft == pytest.approx(cost.t_pre(0, 1000, lp) + cost.t_kv(1000, lp, ld) + cost.t_pre(999, 1, ld))
    assert r0.itl == pytest.approx(0.02)
    # round 1: P caches the 1000-token prompt, has D export the history (one step on D), reads the 11 output
    # tokens from D, computes 300
    assert r1.ttft == pytest.approx(cost.t_pre(1010, 1, ld) + cost.t_kv(11, ld, lp) + cost.t_pre(1011, 300, lp)
                                    + cost.t_kv(300, lp, ld)
                                    + cost.t_pre(1310, 1, ld))
    assert r1.kv_bytes == (11 + 300) * cost.kv_bytes_per_token
    assert r1.start == pytest.approx(r0.start + r0.ttft + 10 * 0.02 + 5.0)


def test_zero_load_local_prefill_equals_the_cost_model():
    cost = FakeCost(step=0.02)
    s = session("s", 0.0, (1000, 11, 1.0), (300, 6, 0.0))
    r0, r1 = run(("0", "1x2"), [s], "colocated", cost=cost, serving=ENGINE_ONLY).records
    assert r0.ttft == pytest.approx(cost.t_pre(0, 1000, Layout(2)))
    assert r1.ttft == pytest.approx(cost.t_pre(1011, 300, Layout(2)))
    assert r0.itl == pytest.approx(0.02) and r0.kv_bytes == 0 and r0.route == "local"


def test_local_prefill_shares_steps_with_the_decode_batch():
    """A 1000-token local prefill under a 100-token budget runs as 10 mixed steps with the decode batch:
    the prefill's TTFT counts 10 decode steps, and the decode round's TPOT absorbs the chunks."""
    cost = FakeCost(step=0.01, hist_per_token=0.0)
    long_decode = session("a", 0.0, (100, 201, 0.0))
    late_prefill = session("b", 0.5, (1000, 2, 0.0))  # ~1 s of prefill in the middle of a's decode
    terms = ENGINE_ONLY.replace(token_budget=100)
    alone = run(("0", "1"), [long_decode], "colocated", cost=cost, serving=terms).records[0]
    result = run(("0", "1"), [long_decode, late_prefill], "colocated", cost=cost, serving=terms)
    shared = {r.session_id: r for r in result.records}
    assert alone.itl == pytest.approx(0.01)
    # b's chunks: 99 tokens per step (a's decode token takes one of the 100): 11 mixed steps, each costing
    # a decode step plus the chunk's share of T_pre beyond its constant (here 0.001 s per chunk token, −0.001)
    assert result.counters["mixed_steps"] == 11
    chunks = 1000 * 0.001 - 11 * 0.001
    assert shared["b"].ttft == pytest.approx(11 * 0.01 + chunks)
    assert shared["a"].itl == pytest.approx(alone.itl + chunks / 200)
    # with the default budget the whole prompt fits one step: one mixed step, no pause of its own
    whole = run(("0", "1"), [long_decode, late_prefill], "colocated", cost=cost, serving=ENGINE_ONLY)
    assert whole.counters["mixed_steps"] == 1


def test_eviction_re_prefills_the_whole_context():
    cost = FakeCost(capacity=3000, step=0.001)
    a = session("a", 0.0, (1000, 100, 50.0), (200, 10, 0.0))  # long tool call: idle, evictable
    b = session("b", 1.0, (2000, 100, 0.0))  # 2100 + 1100 > 3000: a must go
    result = run(("0", "1"), [a, b], "colocated", cost=cost, serving=ENGINE_ONLY)
    rec = {(r.session_id, r.round_index): r for r in result.records}
    assert result.counters["evictions"] == 1
    assert rec[("a", 1)].input_tokens == 1000 + 100 + 200  # l_hist = 0: whole context again
    assert rec[("a", 1)].ttft == pytest.approx(cost.t_pre(0, 1300, Layout(1)))
    assert result.counters["reprefill_tokens"] == 1100


def test_no_eviction_keeps_the_history():
    cost = FakeCost(capacity=100_000, step=0.001)
    a = session("a", 0.0, (1000, 100, 50.0), (200, 10, 0.0))
    result = run(("0", "1"), [a], "colocated", cost=cost)
    assert result.records[1].input_tokens == 200 and result.counters["evictions"] == 0


def test_a_round_waits_for_memory_held_by_running_rounds():
    cost = FakeCost(capacity=3000, step=0.01)
    a = session("a", 0.0, (1000, 500, 0.0))  # decoding for 5 s, holds 1500 tokens
    b = session("b", 0.1, (1400, 200, 0.0))  # 1600 more do not fit until a ends
    result = run(("0", "1"), [a, b], "colocated", cost=cost)
    rec = {r.session_id: r for r in result.records}
    assert result.counters["memory_waits"] == 1
    a_end = rec["a"].start + rec["a"].ttft + 499 * 0.01
    assert rec["b"].ttft >= a_end - 0.1
    assert all(r.error is None for r in result.records)


def test_a_context_larger_than_memory_fails_its_rounds_clearly():
    cost = FakeCost(capacity=1000)
    s = session("s", 0.0, (600, 10, 0.1), (600, 10, 0.0), (10, 10, 0.0))
    result = run(("0", "1"), [s], "colocated", cost=cost)
    assert [r.round_index for r in result.records] == [0, 1, 2]
    assert result.records[0].error is None
    assert "exceeds the decode worker's KV capacity" in result.records[1].error
    assert result.records[2].error is not None


def test_counters_and_summary():
    sessions = generate("hotpotqa", 20, rate=2.0, seed=1)
    result = run(("1", "1"), sessions)
    summary = result.summary(2.0, 0.1)
    assert summary["rounds"] == 60 and summary["policy"] == "ampd"
    assert summary["deployment"] == {"prefill": {"replicas": 1, "tp": 1, "pp": 1},
                                     "decode": {"replicas": 1, "tp": 1, "pp": 1}, "gpus": 2}
    assert result.events > 60
    assert result.counters["local"] + result.counters["remote"] == 60


def test_bad_inputs():
    with pytest.raises(ValueError, match="SLOs must be positive"):
        run(("1", "1"), [], ttft_slo=0)
    with pytest.raises(ValueError, match="at least one decode worker"):
        run(("1", "0"), [])
    with pytest.raises(ValueError, match="unknown policy"):
        run(("1", "1"), [], "fastest")
    with pytest.raises(ValueError, match="cannot hold the model weights"):
        run(("1", "1"), [], cost=FakeCost(capacity=0))


def test_progress_is_reported():
    seen = []
    run(("1", "1"), generate("toolbench", 300, rate=5.0, seed=0), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (300, 300) and seen[0] == (256, 300)


def test_the_simulator_lets_the_policy_order_each_queue():
    """Busy prefill worker, then a long and two short prefills queue up: Algorithm 2 runs the short ones first.

    A short first round ("warm") gives the prefill worker a known, low TTFT window, so the queued work is
    sent there by the TTFT gate (an empty window on a busy worker is unknown, not slack).
    """
    cost = FakeCost(step=0.001)
    sessions = [session("warm", 0.0, (100, 2, 0.0)), session("busy", 0.15, (1000, 2, 0.0)),
                session("long", 0.25, (1500, 2, 0.0)), session("s1", 0.35, (100, 2, 0.0)),
                session("s2", 0.45, (100, 2, 0.0))]
    def ttfts(params):
        result = simulate(Deployment.parse("1", "1"), sessions, "ampd", cost, itl_slo=0.1, ttft_slo=1.5,
                          policy_params={**params, "alpha": 1.0, "beta": 0.01})
        return {r.session_id: r.ttft for r in result.records}

    fifo, reordered = ttfts({"reorder": False}), ttfts({})
    assert fifo["s1"] > 1.5 and fifo["s2"] > 1.5  # stuck behind the long prefill
    assert reordered["s1"] < 1.5 and reordered["s2"] < 1.5
    assert reordered["long"] > fifo["long"]


def test_sglang_remote_round_recomputes_the_history_on_p_and_reads_none():
    """SGLang's prefill worker never reads the history from D: it recomputes what its cache lacks."""
    cost = FakeCost(step=0.02)
    s = session("s", 1.0, (1000, 11, 5.0), (300, 6, 0.0))
    lp, ld = Layout(2, backend="sglang"), Layout(1, backend="sglang")
    result = simulate(Deployment(Pool(1, lp), Pool(1, ld)), [s], "disagg", cost, serving=ENGINE_ONLY, **SLO)
    r0, r1 = result.records
    assert r0.ttft == pytest.approx(cost.t_pre(0, 1000, lp) + cost.t_kv(1000, lp, ld) + cost.t_pre(999, 1, ld))
    # round 1: P caches round 0's 1000-token prompt (not its 11 output tokens): it computes 311 tokens, no
    # export on D, no history read; D receives the 300 tokens past the 1011 it holds.
    assert r1.ttft == pytest.approx(cost.t_pre(1000, 311, lp) + cost.t_kv(300, lp, ld) + cost.t_pre(1310, 1, ld))
    assert r1.kv_bytes == 300 * cost.kv_bytes_per_token
    vllm = run(("1x2", "1"), [s], "disagg", cost=cost, serving=ENGINE_ONLY).records[1]
    assert vllm.ttft != pytest.approx(r1.ttft)  # the two backends are priced differently


def test_a_deployment_the_connector_cannot_map_is_refused_up_front():
    from ampd_plugin.costmodel import build_cost_model

    cost = build_cost_model("Llama-3.1-70B", "H20")  # 8 KV heads
    s = [session("s", 0.0, (100, 5, 0.0))]
    with pytest.raises(ValueError, match="decode TP=6 with 8 KV heads: the heads split neither evenly"):
        simulate(Deployment(Pool(1, Layout(4)), Pool(1, Layout(6))), s, "disagg", cost, **SLO)
    with pytest.raises(ValueError, match="same TP on both sides"):
        simulate(Deployment(Pool(1, Layout(4, backend="sglang")), Pool(1, Layout(8, backend="sglang"))), s,
                 "disagg", cost, **SLO)
    assert simulate(Deployment(Pool(1, Layout(4)), Pool(1, Layout(8))), s, "disagg", cost, **SLO).records
