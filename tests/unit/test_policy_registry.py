"""Policy registry and runner: discovery, parameter checks, decision validation, binding."""

from __future__ import annotations

import pytest

from ampd_plugin.router_policy.registry import (
    PolicyError,
    PolicyRunner,
    available_policies,
    build_runner,
    load_policy,
    policy_params,
)
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import PrefillTask, Route, SessionInfo

from policy_fakes import FakeCost, cluster


def task(sid="s"):
    return PrefillTask(sid, 0, 0, 100, 0.0, decode_worker="d0")


class Fixed:
    """A third-party style policy returning whatever it is told to."""

    def __init__(self, cost_model, *, route=None, bind=None, order=None):
        self.route, self.bind, self.order = route, bind, order

    @hookimpl
    def route_prefill(self, task, cluster):
        return self.route

    @hookimpl
    def bind_session(self, session, cluster):
        return self.bind

    @hookimpl
    def order_queue(self, worker, now):
        return self.order


def test_the_four_policies_are_installed():
    assert {"ampd", "disagg", "colocated", "threshold"} <= set(available_policies())
    assert isinstance(load_policy("ampd", FakeCost()), PolicyRunner)


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*ampd.*colocated.*disagg.*threshold"):
        load_policy("nope", FakeCost())


def test_unknown_parameter_is_rejected_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'disagg' does not accept parameter\(s\) alpha; accepted:.*ttft_slo"):
        load_policy("disagg", FakeCost(), alpha=0.5)


def test_parameters_include_inherited_ones():
    from ampd_plugin.router_policy.ampd import AMPDPolicy

    params = policy_params(AMPDPolicy)
    assert params["alpha"] == 0.9 and params["beta"] == 0.85 and params["w"] == 3
    assert params["ttft_slo"] == 2.0 and params["seed"] == 0 and params["window_s"] == 10.0


@pytest.mark.parametrize("bad", [dict(ttft_slo=0), dict(itl_slo=-1), dict(alpha=1.5), dict(w=0)])
def test_bad_parameter_values(bad):
    with pytest.raises(ValueError, match="policy 'ampd': bad parameters"):
        load_policy("ampd", FakeCost(), **bad)


def test_window_is_exposed_to_drivers():
    assert load_policy("ampd", FakeCost(), window_s=5).window_s == 5.0


@pytest.mark.parametrize(
    "route,message",
    [
        (Route("remote", "p9"), "unknown remote worker 'p9'"),
        (Route("local", "d1"), "bound to 'd0'"),
        (None, "not a Route"),
    ],
)
def test_invalid_routes_name_the_policy(route, message):
    runner = build_runner("fixed", Fixed, FakeCost(), route=route)
    with pytest.raises(PolicyError, match=message) as err:
        runner.route_prefill(task(), cluster(1, 2))
    assert "fixed" in str(err.value) or route is not None


def test_route_to_dead_worker_is_an_error():
    c = cluster(1, 1)
    c.prefill["p0"].alive = False
    runner = build_runner("fixed", Fixed, FakeCost(), route=Route("remote", "p0"))
    with pytest.raises(PolicyError, match="policy 'fixed' routed to dead worker 'p0'"):
        runner.route_prefill(task(), c)


def test_unbound_task_takes_its_binding_or_fails():
    c = cluster(1, 1)
    runner = load_policy("colocated", FakeCost())
    t = PrefillTask("s", 0, 0, 10, 0.0)
    with pytest.raises(PolicyError, match="not bound"):
        runner.route_prefill(t, c)
    c.bindings["s"] = "d0"
    assert runner.route_prefill(t, c).worker == "d0"


def test_order_must_be_a_permutation():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    p.queue = [task("a"), task("b")]
    runner = build_runner("fixed", Fixed, FakeCost(), order=[p.queue[0]])
    with pytest.raises(PolicyError, match="permutation"):
        runner.order_queue(p, 0.0)


def test_order_is_written_back_to_the_queue():
    c = cluster(1, 1)
    p = c.prefill["p0"]
    a, b = task("a"), task("b")
    p.queue = [a, b]
    build_runner("fixed", Fixed, FakeCost(), order=[b, a]).order_queue(p, 0.0)
    assert p.queue == [b, a]


def test_binding_by_memory_use_then_bound_sessions():
    c = cluster(0, 3)
    c.decode["d0"].kv_used_tokens = 50_000
    runner = load_policy("ampd", FakeCost())
    assert runner.bind_session(SessionInfo("s1"), c) == "d1"
    assert c.bindings["s1"] == "d1"
    assert runner.bind_session(SessionInfo("s2"), c) == "d2"  # d1 and d2 both empty; d1 has a session
    c.decode["d2"].kv_used_tokens = 10
    assert runner.bind_session(SessionInfo("s3"), c) == "d1"


def test_bind_to_dead_worker_is_an_error_and_no_worker_is_clear():
    c = cluster(0, 1)
    c.decode["d0"].alive = False
    with pytest.raises(PolicyError, match="no live decode worker"):
        load_policy("ampd", FakeCost()).bind_session(SessionInfo("s"), c)
    runner = build_runner("fixed", Fixed, FakeCost(), bind="d0")
    with pytest.raises(PolicyError, match="policy 'fixed' bound session 's' to dead decode worker 'd0'"):
        runner.bind_session(SessionInfo("s"), c)
