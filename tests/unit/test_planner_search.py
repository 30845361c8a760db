"""The planner's ILP against brute force, its diagnoses, placement and determinism (fake cost model)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ampd_plugin.planner.latency_tables import LatencyModel, WorkloadStats
from ampd_plugin.costmodel import Layout, LinkPricing
from ampd_plugin.planner.placement import place
from ampd_plugin.planner.search import (Candidate, PlanInfeasible, PlanRequest, build_tables, evaluate, score,
                                        search, solve_ilp)


class DegreeCost:
    """Linear costs that shrink with the TP degree; weights need `min_degree` GPUs."""

    kv_bytes_per_token = 1000

    def __init__(self, min_degree=1, pre=2e-4, step=0.01, per_seq=1e-3, cap_per_gpu=200_000):
        self.min_degree, self.pre, self.step, self.per_seq, self.cap = min_degree, pre, step, per_seq, cap_per_gpu

    def t_pre(self, l_hist, l_incr, layout):
        return 0.02 + self.pre * (l_incr + 0.1 * l_hist) / layout.tp ** 0.8

    def t_dec(self, batch, context_tokens, layout):
        return (self.step + self.per_seq * batch + 1e-7 * context_tokens) / layout.tp ** 0.6

    def t_kv(self, tokens, src, dst, link="net"):
        bw = 1e9 if link == "net" else 1e10
        return 0.0 if link == "local" else tokens * self.kv_bytes_per_token / bw

    def kv_capacity_tokens(self, layout):
        return 0 if layout.tp < self.min_degree else self.cap * layout.tp


def stats(seed=0, sessions=60):
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(sessions):
        hist = 0
        for _ in range(int(rng.integers(1, 5))):
            inc, out = int(rng.integers(100, 1500)), int(rng.integers(10, 100))
            rounds.append((hist, inc, out, float(rng.uniform(0.5, 3))))
            hist += inc + out
    return WorkloadStats.from_rounds(rounds, sessions, "test")


def request(**kw):
    base = dict(cost_model=DegreeCost(), stats=stats(), rate=2.0, ttft_slo=1.0, itl_slo=0.05, gpus=8,
                degrees=(1, 2, 4), gpus_per_node=8, top_k=3)
    base.update(kw)
    return PlanRequest(**base)


def brute_force(req):
    """Every allocation within the budget, scored by the ILP's own objective."""
    tables = build_tables(req)
    degs = tables[0].degrees
    ranges = [range(req.gpus // n + 1) for n in degs]
    scored = []
    for xs in itertools.product(*ranges):
        if sum(n * k for n, k in zip(degs, xs)) >= req.gpus:
            continue
        for ys in itertools.product(*ranges):
            cand = Candidate(dict(zip(degs, xs)), dict(zip(degs, ys)), math.inf)
            worst, detail = evaluate(req, tables, cand)
            if math.isfinite(worst):
                scored.append((score(req, cand, detail, worst), cand))
    scored.sort(key=lambda s: s[0])
    return tables, scored


@pytest.mark.parametrize("gpus,rate,homogeneous", [(4, 1.0, True), (6, 2.0, True), (8, 3.0, True),
                                                   (6, 2.0, False), (8, 4.0, False)])
def test_ilp_matches_brute_force(gpus, rate, homogeneous):
    req = request(gpus=gpus, rate=rate, homogeneous=homogeneous)
    tables, scored = brute_force(req)
    assert scored, "the test case must be feasible"
    found = []
    for _ in range(3):
        cand = solve_ilp(req, tables, exclude=found)
        if cand is None:
            break
        found.append(cand)
    milp_scores = [c.score for c in found]
    brute_scores = [s for s, _ in scored[: len(found)]]
    assert milp_scores == pytest.approx(brute_scores, rel=1e-6, abs=1e-6)
    # The top-K are distinct allocations.
    labels = [c.label() for c in found]
    assert len(set(labels)) == len(labels)


def test_per_replica_load_depends_on_replica_count():
    req = request()
    model = LatencyModel(req.cost_model, req.stats, req.ttft_slo, req.itl_slo)
    table = model.prefill_table([2])
    # More replicas -> lower utilisation level -> lower tau.
    levels = [table.level_for(k * table.mu[2], req.round_rate) for k in (2, 3, 4)]
    taus = [table.tau[2][lvl] for lvl in levels]
    assert taus[0] > taus[1] > taus[2]


def test_memory_constraint_counts_resident_sessions():
    # Tiny KV capacity: one decode replica cannot hold the resident sessions; the plan must add decode memory.
    req = request(cost_model=DegreeCost(cap_per_gpu=6_000), gpus=12, rate=1.0)
    result = search(req)
    best = result.candidates[0]
    held = sum(6_000 * n * k for n, k in best.decode.items())
    from ampd_plugin.planner.search import resident_tokens
    assert held >= resident_tokens(req)


def test_model_that_fits_nowhere_is_explained():
    req = request(cost_model=DegreeCost(min_degree=16))
    with pytest.raises(PlanInfeasible, match="weights do not fit"):
        search(req)


def test_impossible_slo_is_explained():
    req = request(ttft_slo=1e-4)
    with pytest.raises(PlanInfeasible, match="impossible at any allocation"):
        search(req)


def test_budget_too_small_is_explained():
    req = request(rate=500.0, gpus=4)
    with pytest.raises(PlanInfeasible, match="need at least"):
        search(req)


def test_degree_wider_than_budget_is_explained():
    with pytest.raises(PlanInfeasible, match="no parallel degree"):
        search(request(degrees=(16,), gpus=8))


def test_bad_request_values():
    for kw in (dict(rate=0), dict(gpus=0), dict(degrees=(0,)), dict(gpus_per_node=0)):
        with pytest.raises(ValueError):
            request(**kw)


def test_search_is_deterministic():
    a = search(request(gpus=16, gpus_per_node=4, rate=4.0)).to_dict()
    b = search(request(gpus=16, gpus_per_node=4, rate=4.0)).to_dict()
    a.pop("solve_seconds"), b.pop("solve_seconds")
    assert a == b


def test_same_tp_constraint_for_sglang():
    result = search(request(gpus=12, rate=3.0, same_tp=True, top_k=4))
    for c in result.candidates:
        assert {n for n, k in c.prefill.items() if k} == {n for n, k in c.decode.items() if k}


def test_colocated_policy_has_one_pool():
    result = search(request(policy="colocated"))
    assert all(not any(c.prefill.values()) for c in result.candidates)
    assert "colocated" in result.candidates[0].predicted


def test_simulator_results_rank_candidates():
    req = request(top_k=3)
    calls = []

    def fake_sim(cand, rate):
        calls.append((cand.label(), rate))
        # Prefer the candidate with the most decode GPUs.
        att = min(1.0, 0.5 + 0.1 * sum(n * k for n, k in cand.decode.items())) if rate <= req.rate else 0.5
        return {"slo_attainment": att}

    result = search(req, fake_sim, rate_factors=(0.5, 1.0, 2.0))
    assert len(calls) == 3 * len(result.candidates)
    atts = [c.simulated["slo_attainment"] for c in result.candidates]
    assert atts == sorted(atts, reverse=True)
    assert all(c.goodput in (0.0, req.rate * 0.5, req.rate) for c in result.candidates)


def test_placement_mixes_pools_on_nodes_and_prices_links():
    cand = Candidate({2: 4}, {2: 4}, 0.0)
    p = place(cand, gpus=16, gpus_per_node=8)
    assert p.nodes == 2
    for node in range(2):
        kinds = {r.kind for r in p.on_node(node)}
        assert kinds == {"prefill", "decode"}  # each node is a P+D segment
        devices = sorted(d for r in p.on_node(node) for d in r.devices)
        assert devices == list(range(8))  # contiguous, no overlap
    assert p.intra_node_fraction == pytest.approx(0.5)
    # A replica never spans nodes, even when a pool's degree equals the node size.
    p8 = place(Candidate({8: 1}, {4: 2}, 0.0), gpus=16, gpus_per_node=8)
    assert all(len(r.devices) == r.degree and max(r.devices) < 8 for r in p8.replicas)


def test_link_pricing_mixes_intra_and_cross_node():
    base = DegreeCost()
    lay = Layout(1)
    mixed = LinkPricing(base, intra_node_fraction=0.25)
    expect = 0.25 * base.t_kv(1000, lay, lay, "nvlink") + 0.75 * base.t_kv(1000, lay, lay, "net")
    assert mixed.t_kv(1000, lay, lay) == pytest.approx(expect)
    fast = LinkPricing(base, net_gbps=100.0)
    assert fast.t_kv(1000, lay, lay, "net") < base.t_kv(1000, lay, lay, "net")
    assert fast.t_pre(0, 10, lay) == base.t_pre(0, 10, lay)  # everything else delegates
    with pytest.raises(ValueError):
        LinkPricing(base, link_gbps=0)


def test_fast_links_make_cross_node_plans_cheaper():
    slow = search(request(gpus=16, gpus_per_node=4, rate=4.0, ttft_slo=0.5)).candidates[0]
    fast_req = request(cost_model=LinkPricing(DegreeCost(), net_gbps=1000.0), gpus=16, gpus_per_node=4,
                       rate=4.0, ttft_slo=0.5)
    fast = search(fast_req).candidates[0]
    assert fast.objective <= slow.objective + 1e-9


class HeadsCost(DegreeCost):
    """DegreeCost for a model with `heads` KV heads (and optionally hybrid layers)."""

    def __init__(self, heads, hybrid="", **kw):
        super().__init__(**kw)
        from ampd_plugin.costmodel import ModelSpec

        self.model = ModelSpec("m", 1024, 4, 12, heads, 64, 4096, 1000, hybrid=hybrid)
        self.num_key_value_heads = heads


def test_degrees_the_connector_cannot_map_are_left_out_with_the_reason():
    # 6 KV heads: TP 4 splits them unevenly and is not a multiple of 6; TP 1, 2, 3 serve.
    req = request(cost_model=HeadsCost(6), degrees=(1, 2, 3, 4), gpus=8)
    tables = build_tables(req)
    assert tables[0].degrees == (1, 2, 3) and tables[1].degrees == (1, 2, 3)
    result = search(req)
    assert any("TP=4 with 6 KV heads" in w for w in result.warnings)
    for cand in result.candidates:
        for n in (k for k, v in cand.prefill.items() if v):
            for m in (k for k, v in cand.decode.items() if v):
                assert n % m == 0 or m % n == 0, cand.label()  # 2 and 3 never pair
    # A pair that does not divide is refused by the objective too.
    bad = Candidate({2: 1}, {3: 2}, math.inf)
    assert evaluate(req, tables, bad)[0] == math.inf
    with pytest.raises(PlanInfeasible, match="TP=4 with 6 KV heads"):
        search(request(cost_model=HeadsCost(6), degrees=(4,)))


def test_hybrid_models_cannot_be_planned_disaggregated():
    cm = HeadsCost(8, hybrid="layer_types has linear_attention (hybrid KV cache)")
    with pytest.raises(PlanInfeasible, match="cannot be served disaggregated: layer_types has linear_attention"):
        search(request(cost_model=cm))
    assert search(request(cost_model=cm, policy="colocated")).candidates  # no KV moves: fine


def test_hybrid_detection_from_hf_configs():
    from ampd_plugin.costmodel import ModelSpec

    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=100, intermediate_size=128)
    assert ModelSpec.from_hf_config(base).hybrid == ""
    assert ModelSpec.from_hf_config({**base, "layer_types": ["full_attention"] * 2}).hybrid == ""
    assert "sliding_attention" in ModelSpec.from_hf_config({**base, "layer_types": ["sliding_attention"]}).hybrid
    assert "mamba" in ModelSpec.from_hf_config({**base, "model_type": "mamba2"}).hybrid
    assert "ssm_state_size" in ModelSpec.from_hf_config({**base, "ssm_state_size": 16}).hybrid


def test_sglang_surrogate_prices_the_recompute_and_no_history_read():
    st = WorkloadStats.from_rounds([(0, 1000, 10, 1.0), (1010, 200, 10, 1.0)], 1)
    st.prev_out = np.array([0.0, 10.0])
    cm = DegreeCost()
    vllm = LatencyModel(cm, st, 1.0, 0.05)
    sgl = LatencyModel(cm, st, 1.0, 0.05, backend="sglang")
    lay = Layout(2)
    assert vllm.prefill_service(2)[1] == pytest.approx(cm.t_pre(1010, 200, lay))
    # P served round 0 and caches its prompt (1000), not its 10 output tokens: computes 210.
    assert sgl.prefill_service(2)[1] == pytest.approx(cm.t_pre(1000, 210, lay))
    assert vllm.transfer_time(2, 2)[1] == pytest.approx(cm.t_kv(1010, lay, lay) + cm.t_kv(200, lay, lay))
    assert sgl.transfer_time(2, 2)[1] == pytest.approx(cm.t_kv(200, lay, lay))
