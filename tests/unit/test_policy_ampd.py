"""AMPD policy: every branch of Algorithm 1, Algorithm 2's choice and its starvation bound."""

from __future__ import annotations

import pytest

from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router_policy.state import PrefillTask

from policy_fakes import FakeCost, cluster

SLO = dict(ttft_slo=2.0, itl_slo=0.1)


def task(l_hist=1000, l_incr=500, enq=0.0, worker="d0", sid="s"):
    return PrefillTask(sid, 1, l_hist, l_incr, enq, decode_worker=worker)


def ampd(**params):
    return load_policy("ampd", FakeCost(), **{**SLO, **params})


def pressure(c, now=1.0, ttft=3.0, itl=None):
    c.now = now
    for p in c.prefill.values():
        c.record_ttft(p.worker_id, now, ttft)
    if itl is not None:
        for d in c.decode.values():
            c.record_itl(d.worker_id, now, itl)


def test_remote_to_the_prefill_worker_with_ttft_slack():
    c = cluster(2, 1)
    c.now = 1.0
    c.record_ttft("p0", 1.0, 1.9)  # > 0.9 * 2.0: pressured
    c.record_ttft("p1", 1.0, 1.7)  # slack
    route = ampd().route_prefill(task(), c)
    assert (route.kind, route.worker, route.reason) == ("remote", "p1", "ttft-slack")


def test_idle_prefill_worker_without_samples_counts_as_slack():
    c = cluster(2, 1)
    c.now = 100.0
    c.record_ttft("p0", 100.0, 5.0)
    c.record_ttft("p1", 80.0, 5.0)  # older than the 10 s window: p1 is idle now
    assert ampd().route_prefill(task(), c).worker == "p1"


def test_local_when_no_prefill_slack_and_itl_slack():
    c = cluster(2, 1)
    pressure(c, itl=0.08)  # 0.08 <= 0.85 * 0.1
    route = ampd().route_prefill(task(), c)
    assert (route.kind, route.worker, route.reason) == ("local", "d0", "itl-slack")


def test_local_when_decode_worker_has_no_itl_samples():
    c = cluster(2, 1)
    pressure(c)
    assert ampd().route_prefill(task(), c).reason == "itl-slack"


def test_fallback_picks_remote_when_it_is_cheaper():
    c = cluster(2, 1)
    pressure(c, itl=0.2)
    c.decode["d0"].queue = [task(0, 3000, sid="other")]  # 3 s of local backlog
    c.prefill["p0"].queue = [task(0, 1000, sid="x")]  # 1 s
    # t_local = 0.6 + 3.0; t_remote(p1) = 0.6 + 1000*1e-5 + 500*1e-5 = 0.615; p0 = 1.615
    route = ampd().route_prefill(task(), c)
    assert (route.kind, route.worker, route.reason) == ("remote", "p1", "cost-remote")


def test_fallback_picks_local_when_it_is_cheaper():
    c = cluster(2, 1)
    pressure(c, itl=0.2)
    for p in c.prefill.values():
        p.queue = [task(0, 1000, sid="x")]
    # t_local = 0.6 < t_remote = 0.615 + 1.0
    route = ampd().route_prefill(task(), c)
    assert (route.kind, route.reason) == ("local", "cost-local")


def test_fallback_charges_the_running_tasks_remaining_time():
    c = cluster(1, 1)
    pressure(c, now=10.0, itl=0.2)
    running = task(0, 2000, sid="r")  # predicted 2.0 s, started 1.9 s ago: 0.1 s left
    running.started_at = 8.1
    c.prefill["p0"].running = running
    c.decode["d0"].queue = [task(0, 300, sid="q")]  # 0.3 s
    # t_remote = 0.615 + 0.1 = 0.715 < t_local = 0.6 + 0.3
    assert ampd().route_prefill(task(), c).kind == "remote"
    running.started_at = 9.9  # now 1.9 s left: local wins
    assert ampd().route_prefill(task(), c).kind == "local"


def test_random_order_is_seeded():
    def choices(seed):
        c = cluster(4, 1)
        policy = ampd(seed=seed)
        return [policy.route_prefill(task(), c).worker for _ in range(60)]

    assert choices(7) == choices(7)
    assert choices(7) != choices(8)
    assert set(choices(7)) == {"p0", "p1", "p2", "p3"}


def test_dead_prefill_workers_are_skipped():
    c = cluster(2, 1)
    c.prefill["p0"].alive = False
    assert {ampd(seed=s).route_prefill(task(), c).worker for s in range(10)} == {"p1"}


def test_locality_prefers_the_worker_caching_the_session():
    c = cluster(4, 1)
    c.prefill["p2"].cached_prefix["s"] = 900
    c.prefill["p3"].cached_prefix["s"] = 400
    assert {ampd(seed=s, locality=True).route_prefill(task(), c).worker for s in range(10)} == {"p2"}


def test_locality_charges_only_uncached_history_in_fallback():
    c = cluster(2, 1)
    pressure(c, itl=0.2)
    cost = FakeCost(kv_per_token=0.001)  # history transfer 1.0 s for 1000 tokens
    c.prefill["p1"].cached_prefix["s"] = 1000
    c.decode["d0"].queue = [task(0, 1000, sid="o")]  # local: 0.6 + 1.0
    plain = load_policy("ampd", cost, **SLO).route_prefill(task(), c)
    local_aware = load_policy("ampd", cost, locality=True, **SLO).route_prefill(task(), c)
    assert plain.kind == "local"  # remote = 0.6 + 1.0 + 0.5 = 2.1 > 1.6
    assert (local_aware.kind, local_aware.worker) == ("remote", "p1")  # 0.6 + 0 + 0.5 = 1.1


def test_predictive_slack_looks_at_the_queue_not_only_the_window():
    c = cluster(2, 1)
    c.prefill["p0"].queue = [task(0, 1000, sid="x")]  # 1 s queued: predicted 1.615 s <= 1.8 s, still slack
    c.prefill["p1"].queue = [task(0, 100, sid="y")]  # 0.1 s queued: predicted 0.715 s
    paper = {ampd(seed=s).route_prefill(task(), c).worker for s in range(12)}
    assert paper == {"p0", "p1"}  # random among windowed-slack workers
    assert {ampd(seed=s, predictive=True).route_prefill(task(), c).worker for s in range(12)} == {"p1"}


def test_predictive_drops_busy_workers_whose_prediction_misses_the_gate():
    c = cluster(2, 1)
    for p in c.prefill.values():
        p.queue = [task(0, 1500, sid="x")]  # predicted 2.115 s > 0.9 * 2.0 although the windows are empty
    # An empty window on a busy worker is unknown, not slack: the paper's policy judges it by prediction too.
    for policy in (ampd(), ampd(predictive=True)):
        route = policy.route_prefill(task(), c)
        assert (route.kind, route.reason) == ("local", "itl-slack")
    for p in c.prefill.values():
        p.queue = []  # idle with no sample: slack (nothing to wait behind)
    assert ampd().route_prefill(task(), c).reason == "ttft-slack"


def test_unknown_itl_of_a_running_batch_is_not_slack():
    c = cluster(1, 1)
    c.prefill["p0"].ttft.add(0.0, 10.0)  # no TTFT slack anywhere
    d = c.decode["d0"]
    assert ampd().route_prefill(task(), c).reason == "itl-slack"  # idle decode worker, no ITL sample: slack
    d.decoding = 3  # rounds decoding, but no ITL sample yet: unknown → the cost-model fallback decides
    assert ampd().route_prefill(task(), c).reason in ("cost-local", "cost-remote")
    d.itl.add(0.0, 0.01)  # a known, low ITL: slack again
    assert ampd().route_prefill(task(), c).reason == "itl-slack"


def test_predictive_keeps_an_idle_worker_for_a_task_too_long_for_the_gate():
    c = cluster(2, 1)
    c.prefill["p0"].queue = [task(0, 100, sid="x")]
    long_task = task(0, 5000)  # 5 s anywhere
    route = ampd(predictive=True).route_prefill(long_task, c)
    assert (route.kind, route.worker) == ("remote", "p1")


def test_itl_aware_refuses_a_local_prefill_that_breaks_the_batch_itl():
    c = cluster(1, 1)
    pressure(c, itl=0.05)  # ITL slack under the paper's rule
    c.decode["d0"].decoding = 8
    c.prefill["p0"].queue = [task(0, 1500, sid="x")]  # remote: 0.615 + 1.5 = 2.1 (misses TTFT)
    assert ampd().route_prefill(task(), c).reason == "itl-slack"
    # pause 0.6 s over ~63 tokens adds ~0.0095 s: 0.0595 <= 0.1, local still fine
    assert ampd(itl_aware=True).route_prefill(task(), c).kind == "local"
    c.record_itl("d0", 1.0, 0.12)  # mean 0.085 -> paused ~0.0945 ... still ok
    big = task(0, 3000)  # 3 s pause: +0.048 -> over the SLO for 8 rounds
    route = ampd(itl_aware=True).route_prefill(big, c)
    assert route.kind == "remote"


# -- Algorithm 2 -------------------------------------------------------------------------------------


def make_queue(now):
    a = PrefillTask("a", 0, 0, 1500, now - 1.0)  # 1.5 s, waited 1 s: misses whatever happens
    b = PrefillTask("b", 0, 0, 500, now - 0.5)
    c = PrefillTask("c", 0, 0, 300, now - 0.1)
    return a, b, c


def test_reorder_maximises_tasks_meeting_ttft():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    a, b, t = make_queue(10.0)
    p.queue = [a, b, t]
    order = ampd().order_queue(p, 10.0)
    # FIFO meets 0 of 3; b, c, a meets 2 (the first such ordering in permutation order).
    assert [x.session_id for x in order] == ["b", "c", "a"]
    assert (a.postponed, b.postponed, t.postponed) == (1, 0, 0)


def test_reorder_keeps_the_order_on_ties():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    tasks = [PrefillTask(x, 0, 0, 100, 10.0) for x in "xyz"]
    p.queue = list(tasks)
    assert ampd().order_queue(p, 10.0) == tasks
    assert all(t.postponed == 0 for t in tasks)


def test_reorder_only_touches_the_window():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    a, b, t = make_queue(10.0)
    tail = PrefillTask("tail", 0, 0, 1, 10.0)
    p.queue = [a, b, t, tail]
    assert [x.session_id for x in ampd().order_queue(p, 10.0)] == ["b", "c", "a", "tail"]


def test_reorder_can_be_switched_off():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    p.queue = list(make_queue(10.0))
    assert [x.session_id for x in ampd(reorder=False).order_queue(p, 10.0)] == ["a", "b", "c"]


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_no_task_is_postponed_more_than_w_times(w):
    """A hopeless long task at the head, a stream of short urgent tasks behind it."""
    c = cluster(1, 1)
    p = c.prefill["p0"]
    policy = ampd(w=w)
    now = 10.0
    hopeless = PrefillTask("long", 0, 0, 5000, now - 5.0)
    p.queue = [hopeless]
    overtaken_by = 0
    for i in range(20):
        p.queue.append(PrefillTask(f"short{i}", 0, 0, 100, now))
        p.queue.append(PrefillTask(f"short{i}b", 0, 0, 100, now))
        policy.order_queue(p, now)
        head = p.queue.pop(0)
        if head is hopeless:
            break
        overtaken_by += 1
        now += 0.1
    else:
        pytest.fail("the hopeless task was never dispatched")
    assert hopeless.postponed <= w
    # Each postponement lets at most w - 1 tasks of the window overtake it.
    assert overtaken_by <= w * (w - 1)


def test_a_task_postponed_w_times_stays_at_the_head():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    a, b, t = make_queue(10.0)
    a.postponed = 3
    p.queue = [a, b, t]
    order = ampd().order_queue(p, 10.0)
    # a may not be overtaken any more; behind it, c first still saves c (0.1 + 1.5 + 0.3 <= 2).
    assert [x.session_id for x in order] == ["a", "c", "b"]
    assert a.postponed == 3


def test_decode_worker_queue_is_reordered_with_its_layout():
    c = cluster(0, 1)
    d = c.decode["d0"]
    d.queue = list(make_queue(10.0))
    assert [x.session_id for x in ampd().order_queue(d, 10.0)] == ["b", "c", "a"]


def test_itl_aware_learns_output_length_from_metrics():
    runner = ampd(itl_aware=True, output_tokens_hint=64)
    for _ in range(200):
        runner.on_metrics("d0", "output_tokens", 500, 1.0)
    runner.on_metrics("d0", "ttft", 9.0, 1.0)  # other kinds are ignored
    assert runner.plugin.output_tokens == pytest.approx(500, rel=0.01)


def test_sglang_prefill_workers_are_priced_with_the_history_recomputed():
    """On SGLang a remote round recomputes on P what P's cache lacks and reads no history from D."""
    from ampd_plugin.costmodel import Layout

    cost = FakeCost()
    c = cluster(1, 1)
    p, d = c.prefill["p0"], c.decode["d0"]
    p.cached_prefix = {"s": 400}
    t = task(l_hist=1000, l_incr=500)
    vllm = ampd(locality=True).plugin._t_remote(t, p, d, 0.0)
    assert vllm == pytest.approx(cost.t_pre(1000, 500, p.layout) + cost.t_kv(600, d.layout, p.layout)
                                 + cost.t_kv(500, p.layout, d.layout))
    p.layout = Layout(1, backend="sglang")
    sgl = ampd().plugin._t_remote(t, p, d, 0.0)  # P's radix cache counts whether or not the policy uses locality
    assert sgl == pytest.approx(cost.t_pre(400, 1100, p.layout) + cost.t_kv(500, p.layout, d.layout))
    assert sgl == pytest.approx(0.04 + 1.1 + 0.005)
    # Under TTFT and ITL pressure the cost-model fallback decides. A TP2 prefill worker that never saw the
    # session: vLLM reads the history (0.3 + 0.01 + 0.005 s) and beats local (0.6 s); SGLang recomputes
    # all 1500 tokens (0.75 + 0.005 s) and loses to local.
    p.cached_prefix = {}
    pressure(c, itl=0.5)
    p.layout = Layout(2)
    assert ampd().route_prefill(t, c).kind == "remote"
    p.layout = Layout(2, backend="sglang")
    assert ampd().route_prefill(t, c).kind == "local"
