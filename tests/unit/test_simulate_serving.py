"""Each engine/serving-path term of the simulator, on hand-built workloads: remove a term and its test fails."""

from __future__ import annotations

import heapq

import pytest

from ampd_plugin.costmodel import Layout
from ampd_plugin.planner.engine_sim import Engine, Job
from ampd_plugin.planner.serving import ServingTerms
from ampd_plugin.planner.simulate import Deployment, simulate
from ampd_plugin.workload import Round, Session

from policy_fakes import FakeCost

ZERO = ServingTerms(router_s=0.0, remote_s=0.0, export_s=0.0, frontend_s=0.0)
L = Layout(1)


def session(sid, arrival, *rounds):
    return Session(sid, arrival, [Round(i, o, d) for i, o, d in rounds])


def run(dep, sessions, policy, cost, serving, **kw):
    return simulate(Deployment.parse(*dep), sessions, policy, cost, ttft_slo=5.0, itl_slo=1.0, serving=serving, **kw)


class Loop:
    """A minimal event loop to drive one Engine."""

    def __init__(self):
        self.now, self.heap, self.seq = 0.0, [], 0

    def at(self, t, fn, arg):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def run(self):
        while self.heap:
            self.now, _, fn, arg = heapq.heappop(self.heap)
            fn(arg)


def test_prefill_worker_batches_prefills_into_one_step():
    cost = FakeCost(pre_per_token=0.001, hist_per_token=0.0)
    loop = Loop()
    eng = Engine(L, cost, ZERO, loop.at, lambda: loop.now)
    firsts = []
    for _ in range(3):
        eng.submit(Job(None, 0, 100, 1, lambda job, now: firsts.append(now)))
    loop.run()
    # the first starts alone; the two that arrived meanwhile share the next step: the step constant
    # (T_pre(0,1)) once, plus twice the part that grows with tokens
    alone = cost.t_pre(0, 100, L)
    shared = cost.t_pre(0, 1, L) + 2 * (cost.t_pre(0, 100, L) - cost.t_pre(0, 1, L))
    assert firsts == [pytest.approx(alone), pytest.approx(alone + shared), pytest.approx(alone + shared)]
    assert eng.steps == 2


def test_token_budget_counts_decode_tokens_and_chunks_long_prompts():
    cost = FakeCost(pre_per_token=0.001, hist_per_token=0.0, step=0.01)
    loop = Loop()
    eng = Engine(L, cost, ZERO.replace(token_budget=64), loop.at, lambda: loop.now)
    done = []
    for _ in range(4):  # four running decodes take 4 of the 64 tokens of every step
        eng.submit(Job(None, 0, 1, 50, lambda job, now: None, lambda job, now: None))
    loop.run()
    eng.submit(Job(None, 0, 1, 50, lambda job, now: None, lambda job, now: None))
    eng.steps = 0
    first = []
    loop.at(loop.now, lambda _: eng.submit(Job(None, 0, 600, 1, lambda job, now: first.append(now))), None)
    loop.run()
    assert first and eng.mixed_steps >= 10  # 600 tokens in chunks of ≤ 63 → 10 steps mixed with the decode


def test_front_end_is_one_fifo_server_per_worker():
    loop = Loop()
    eng = Engine(L, FakeCost(), ZERO.replace(frontend_s=0.002), loop.at, lambda: loop.now)
    assert [eng.front_end(0.0) for _ in range(3)] == [pytest.approx(0.002), pytest.approx(0.004),
                                                      pytest.approx(0.006)]
    assert eng.front_end(1.0) == pytest.approx(1.002)


def test_profiled_t_pre_contains_the_front_end_once():
    cost = FakeCost(pre_per_token=0.001, hist_per_token=0.0)
    fe = 0.0004
    inside = Engine(L, cost, ZERO.replace(frontend_s=fe, frontend_in_t_pre=True), lambda *a: None, lambda: 0.0)
    outside = Engine(L, cost, ZERO.replace(frontend_s=fe), lambda *a: None, lambda: 0.0)
    assert inside.pass_s == pytest.approx(cost.t_pre(0, 1, L) - fe)
    assert outside.pass_s == pytest.approx(cost.t_pre(0, 1, L))


def test_serving_path_fixed_costs_per_route():
    cost = FakeCost(step=0.01, hist_per_token=0.0)
    terms = ServingTerms(router_s=0.003, remote_s=0.005, export_s=0.007, frontend_s=0.011)
    s = session("s", 0.0, (200, 2, 1.0), (100, 2, 0.0))
    local = run(("0", "1"), [s], "colocated", cost, terms).records
    assert local[0].ttft == pytest.approx(0.003 + 0.011 + cost.t_pre(0, 200, L))
    r0, r1 = run(("1", "1"), [s], "disagg", cost, terms).records
    d_step = cost.t_pre(199, 1, L)
    # router hop, P's front end, P's prefill, P answers and the router calls D, D's front end, KV read, D step
    assert r0.ttft == pytest.approx(0.003 + 0.011 + cost.t_pre(0, 200, L) + 0.005 + 0.011
                                    + cost.t_kv(200, L, L) + d_step)
    # round 1: P has the first prompt cached and reads the 2 output tokens from D after asking D to export
    # them (a request on D: its front end and one step), plus the export's own fixed cost
    export = 0.011 + cost.t_pre(201, 1, L) + 0.007
    assert r1.ttft == pytest.approx(0.003 + 0.011 + export + cost.t_kv(2, L, L) + cost.t_pre(202, 100, L)
                                    + 0.005 + 0.011 + cost.t_kv(100, L, L) + cost.t_pre(301, 1, L))


def test_the_router_is_one_first_come_first_served_server():
    cost = FakeCost(step=0.01, hist_per_token=0.0)
    terms = ZERO.replace(router_s=0.004)
    both = [session("a", 0.0, (200, 2, 0.0)), session("b", 0.0, (10, 2, 0.0))]
    rec = {r.session_id: r for r in run(("0", "2"), both, "colocated", cost, terms).records}
    assert rec["a"].ttft == pytest.approx(0.004 + cost.t_pre(0, 200, L))
    assert rec["b"].ttft == pytest.approx(0.008 + cost.t_pre(0, 10, L))  # waited for a's hop


def test_ttft_sample_at_the_first_token_for_the_prefilling_worker_and_tpot_per_round():
    cost = FakeCost(step=0.01, hist_per_token=0.0)
    s = session("s", 0.0, (200, 51, 0.0))
    seen = []

    from ampd_plugin.router_policy.registry import load_policy
    runner = load_policy("disagg", cost)
    original = runner.on_metrics
    runner.on_metrics = lambda wid, kind, value, now: (seen.append((wid, kind, value, now)),
                                                       original(wid, kind, value, now))
    r = run(("1", "1"), [s], runner, cost, ZERO).records[0]
    ttft = [x for x in seen if x[1] == "ttft"]
    itl = [x for x in seen if x[1] == "itl"]
    assert ttft == [("p0", "ttft", pytest.approx(r.ttft), pytest.approx(r.ttft))]  # at the first token
    assert itl == [("d0", "itl", pytest.approx(r.itl), pytest.approx(r.ttft + 50 * 0.01))]  # one per round


def test_migration_under_kv_pressure_as_the_router_does_it():
    """d0's router-side KV count is full (finished sessions stay counted for the TTL): the next round of a
    session with history moves to d1, which reads the history from d0 instead of recomputing it."""
    cost = FakeCost(step=0.001, hist_per_token=0.0, capacity=3000)
    a = session("a", 0.0, (1000, 100, 2.0), (500, 10, 0.0))
    b = session("b", 0.1, (1500, 10, 0.0))  # one round; the router keeps counting its 1510 tokens
    from ampd_plugin.router_policy.registry import load_policy

    runner = load_policy("colocated", cost)
    runner.bind_session = lambda info, cluster: cluster.bindings.setdefault(info.session_id, "d0")
    result = run(("0", "2"), [a, b], runner, cost, ZERO)
    rec = {(r.session_id, r.round_index): r for r in result.records}
    assert result.counters["migrations"] == 1 and result.counters["migrated_tokens"] == 1100
    moved = rec[("a", 1)]
    assert moved.worker == "d1" and moved.kv_bytes == 1100 * cost.kv_bytes_per_token
    assert moved.input_tokens == 500  # only the increment is computed: the history was read, not recomputed
    assert moved.ttft == pytest.approx(cost.t_kv(1100, L, L) + cost.t_pre(1100, 500, L))
    # without a KV connector the router never migrates: the round stays on d0
    runner2 = load_policy("colocated", cost)
    runner2.bind_session = runner.bind_session
    stay = run(("0", "2"), [a, b], runner2, cost, ZERO, kv_connector="none")
    assert stay.counters["migrations"] == 0
    assert {r.worker for r in stay.records} == {"d0"}
    # the router's accounting frees a finished session only after the TTL: with a short TTL, no migration
    runner3 = load_policy("colocated", cost)
    runner3.bind_session = runner.bind_session
    assert run(("0", "2"), [a, b], runner3, cost, ZERO, session_ttl_s=0.5).counters["migrations"] == 0


def test_serving_terms_round_trip_and_validation():
    t = ServingTerms(token_budget=2048, router_s=0.001, frontend_in_t_pre=True)
    assert ServingTerms.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown term"):
        ServingTerms.from_dict({"router": 1})
    with pytest.raises(ValueError, match="token_budget"):
        ServingTerms(token_budget=0)
    with pytest.raises(ValueError, match="router_s"):
        ServingTerms(router_s=-1.0)


def test_binding_sees_rounds_in_flight_only_when_the_router_counts_them():
    """Sessions arrive while a long first round runs on d0: counting rounds in flight steers them to d1 (without
    it, only the binding's tie-break on bound-session counts spreads them)."""
    cost = FakeCost(step=0.01, hist_per_token=0.0)
    sessions = [session("a", 0.0, (100, 300, 0.0)), session("b", 0.5, (100, 2, 0.0)),
                session("c", 1.0, (100, 2, 0.0)), session("d", 1.5, (100, 2, 0.0))]
    today = {r.session_id: r.worker for r in run(("0", "2"), sessions, "colocated", cost, ZERO).records}
    counted = {r.session_id: r.worker for r in run(("0", "2"), sessions, "colocated", cost, ZERO,
                                                   count_inflight=True).records}
    assert today["a"] == counted["a"] == "d0"
    assert sum(w == "d0" for w in today.values()) >= sum(w == "d0" for w in counted.values())
    assert counted["c"] == counted["d"] == "d1"
