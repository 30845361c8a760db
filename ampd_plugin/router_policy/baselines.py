"""The policies AMPD is compared against; each is a plugin of the same spec as AMPD.

- `disagg`: every prefill on a prefill worker (Dynamo / DistServe always-disaggregated PD).
- `colocated`: no prefill pool; each decode worker prefills its own sessions (plain vLLM).
- `threshold`: local on the decode worker when the uncached increment is short, else remote
  (Dynamo conditional disaggregation, llm-d prefix-based PD decider).
All keep their queues first-in first-out (no `order_queue` hook) and do no I/O.
"""

from __future__ import annotations

from typing import Any

from ampd_plugin.costmodel import CostModel
from ampd_plugin.router_policy.base import BasePolicy
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route


class DisaggPolicy(BasePolicy):
    """Always remote, on the prefill worker with the least predicted pending work.

    If no prefill worker is alive the prefill runs locally rather than failing the session.
    """

    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        target = self.least_backlog(cluster, cluster.now)
        if target is None:
            return Route("local", task.decode_worker, "no-live-prefill-worker")
        return Route("remote", target.worker_id, "always-remote")


class ColocatedPolicy(BasePolicy):
    """Every prefill local on the session's decode worker; sessions spread by least KV use."""

    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        return Route("local", task.decode_worker, "colocated")


class ThresholdPolicy(BasePolicy):
    """Local when the uncached increment is at most `max_local_tokens` (default 256), else remote.

    The history is cached on the bound decode worker, so the uncached part is exactly `l_incr`.
    `max_local_ratio` (default 1.0 = off) additionally requires `l_incr / (l_hist + l_incr)` to be below
    it, like Dynamo's `ratio_threshold`.
    """

    def __init__(self, cost_model: CostModel, *, max_local_tokens: int = 256, max_local_ratio: float = 1.0, **base: Any):
        super().__init__(cost_model, **base)
        if int(max_local_tokens) < 0:
            raise ValueError(f"max_local_tokens must be >= 0, got {max_local_tokens}")
        if not 0 < float(max_local_ratio) <= 1:
            raise ValueError(f"max_local_ratio must be in (0, 1], got {max_local_ratio}")
        self.max_local_tokens = int(max_local_tokens)
        self.max_local_ratio = float(max_local_ratio)

    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        total = task.l_hist + task.l_incr
        short = task.l_incr <= self.max_local_tokens
        ratio_ok = self.max_local_ratio >= 1.0 or (total > 0 and task.l_incr / total < self.max_local_ratio)
        if short and ratio_ok:
            return Route("local", task.decode_worker, "short-increment")
        target = self.least_backlog(cluster, cluster.now)
        if target is None:
            return Route("local", task.decode_worker, "no-live-prefill-worker")
        return Route("remote", target.worker_id, "long-increment")
