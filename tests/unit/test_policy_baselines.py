"""Baseline policies: always-disaggregated, co-located, threshold."""

from __future__ import annotations

import pytest

from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router_policy.state import PrefillTask, SessionInfo

from policy_fakes import FakeCost, cluster


def task(l_hist=1000, l_incr=500, sid="s"):
    return PrefillTask(sid, 1, l_hist, l_incr, 0.0, decode_worker="d0")


def test_disagg_routes_to_least_pending_work():
    c = cluster(3, 1)
    c.prefill["p0"].queue = [task(0, 100)]
    c.prefill["p1"].queue = [task(0, 10)]
    c.prefill["p2"].queue = [task(0, 50), task(0, 40)]
    route = load_policy("disagg", FakeCost()).route_prefill(task(), c)
    assert (route.kind, route.worker) == ("remote", "p1")


def test_disagg_counts_pending_work_not_queue_length():
    c = cluster(2, 1)
    c.prefill["p0"].queue = [task(0, 3000)]
    c.prefill["p1"].queue = [task(0, 10), task(0, 10), task(0, 10)]
    assert load_policy("disagg", FakeCost()).route_prefill(task(), c).worker == "p1"


def test_disagg_falls_back_to_local_without_prefill_workers():
    c = cluster(1, 1)
    c.prefill["p0"].alive = False
    route = load_policy("disagg", FakeCost()).route_prefill(task(), c)
    assert (route.kind, route.reason) == ("local", "no-live-prefill-worker")


def test_colocated_is_always_local():
    c = cluster(2, 1)
    policy = load_policy("colocated", FakeCost())
    assert {policy.route_prefill(task(0, n), c).kind for n in (1, 100, 100_000)} == {"local"}


def test_colocated_spreads_sessions():
    c = cluster(0, 3)
    policy = load_policy("colocated", FakeCost())
    workers = [policy.bind_session(SessionInfo(f"s{i}"), c) for i in range(6)]
    assert workers == ["d0", "d1", "d2", "d0", "d1", "d2"]


@pytest.mark.parametrize("l_incr,kind", [(1, "local"), (256, "local"), (257, "remote"), (5000, "remote")])
def test_threshold_default_256(l_incr, kind):
    c = cluster(1, 1)
    assert load_policy("threshold", FakeCost()).route_prefill(task(1000, l_incr), c).kind == kind


def test_threshold_is_configurable():
    c = cluster(1, 1)
    policy = load_policy("threshold", FakeCost(), max_local_tokens=1000)
    assert policy.route_prefill(task(1000, 999), c).kind == "local"
    ratio = load_policy("threshold", FakeCost(), max_local_ratio=0.5)
    assert ratio.route_prefill(task(1000, 200), c).kind == "local"  # 200/1200 < 0.5
    assert ratio.route_prefill(task(100, 200), c).kind == "remote"  # 200/300 >= 0.5


def test_baselines_keep_fifo_order():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    tasks = [PrefillTask(x, 0, 0, n, 0.0) for x, n in (("a", 3000), ("b", 10), ("c", 10))]
    for name in ("disagg", "colocated", "threshold"):
        p.queue = list(tasks)
        assert load_policy(name, FakeCost(), ttft_slo=1.0).order_queue(p, 0.5) == tasks


def test_bad_threshold_parameters():
    with pytest.raises(ValueError, match="max_local_tokens"):
        load_policy("threshold", FakeCost(), max_local_tokens=-1)
    with pytest.raises(ValueError, match="max_local_ratio"):
        load_policy("threshold", FakeCost(), max_local_ratio=0)
