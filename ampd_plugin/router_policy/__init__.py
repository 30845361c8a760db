"""Routing policies: pure decisions over a `ClusterState`, shared by the live router and the simulator.

A policy is a pluggy plugin of `spec.PolicySpec` (hooks marked with `hookimpl`), built as
`cls(cost_model, **params)` and published under the `ampd_plugin.policies` entry-point group; AMPD
(`ampd`) and the baselines (`baselines`) are plugins like any third-party one. Nothing in this package
does I/O or imports the router or the planner. The names below are the public plugin API:

    from ampd_plugin.router_policy import BasePolicy, Route, hookimpl

    class MyPolicy(BasePolicy):
        @hookimpl
        def route_prefill(self, task, cluster):
            return Route("local", task.decode_worker, "always-local")
"""

from ampd_plugin.costmodel import CostModel, Layout
from ampd_plugin.router_policy.base import BasePolicy
from ampd_plugin.router_policy.registry import (
    GROUP,
    PolicyError,
    PolicyRunner,
    available_policies,
    build_runner,
    least_loaded_decode,
    load_policy,
    policy_class,
    policy_params,
)
from ampd_plugin.router_policy.spec import PolicySpec, hookimpl, hookspec
from ampd_plugin.router_policy.state import (
    DECODE,
    PREFILL,
    ClusterState,
    PrefillTask,
    Route,
    SessionInfo,
    WindowedMean,
    WorkerKind,
    WorkerState,
)

__all__ = [
    "DECODE",
    "GROUP",
    "PREFILL",
    "BasePolicy",
    "ClusterState",
    "CostModel",
    "Layout",
    "PolicyError",
    "PolicyRunner",
    "PolicySpec",
    "PrefillTask",
    "Route",
    "SessionInfo",
    "WindowedMean",
    "WorkerKind",
    "WorkerState",
    "available_policies",
    "build_runner",
    "hookimpl",
    "hookspec",
    "least_loaded_decode",
    "load_policy",
    "policy_class",
    "policy_params",
]
