"""pluggy hook specifications for routing policies.

A policy is a plugin object implementing some of these hooks. AMPD and every baseline are plugins of
this one spec; third parties register theirs under the `ampd_plugin.policies` entry-point group.
Hooks are pure decisions: they read a `ClusterState`, may consult a cost model, and do no I/O.
Both drivers — the live router (`ampd_plugin.router`) and the simulator (`planner.simulate`) —
call them through `registry.PolicyRunner`.
"""

from __future__ import annotations

import pluggy

from ampd_plugin.router_policy.state import (
    ClusterState,
    PrefillTask,
    Route,
    SessionInfo,
    WorkerState,
)

PROJECT = "ampd_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PolicySpec:
    @hookspec(firstresult=True)
    def bind_session(self, session: SessionInfo, cluster: ClusterState) -> str | None:
        """Choose the decode worker that will own `session`'s KV and run all its decodes.

        Called at a session's first round and again when its worker died. Return a live decode
        worker id; the driver records the binding in `cluster.bindings`.
        """

    @hookspec(firstresult=True)
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route | None:
        """Decide where `task` (bound to `task.decode_worker`) is prefilled: local or remote."""

    @hookspec(firstresult=True)
    def order_queue(self, worker: WorkerState, now: float) -> list[PrefillTask] | None:
        """Return `worker.queue` reordered; the driver runs the head next.

        May update `PrefillTask.postponed` counters (Algorithm 2's starvation bound).
        """

    @hookspec
    def on_metrics(self, worker_id: str, kind: str, value: float, now: float) -> None:
        """A measurement arrived (kind: "ttft", "itl", "prefill_time", "kv_transfer"...).

        The driver already records TTFT/ITL into the worker windows; this hook is for policies that
        learn (e.g. correct cost-model predictions online).
        """
