"""Find, build and safely drive routing policies.

Policies are plugins of `spec.PolicySpec`, published under the `ampd_plugin.policies` entry-point group
(AMPD and the baselines are registered there by this package's pyproject; third parties add theirs the
same way). `load_policy` builds one and wraps it in a `PolicyRunner`, the only object the drivers (the
live router and the simulator) talk to. The runner checks every decision, so a buggy policy fails with
an error naming it instead of routing a request into a dead or unknown worker.

A policy class is constructed as `cls(cost_model, **params)`; its keyword parameters (with defaults)
are its configuration, and unknown parameter names are rejected before construction.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any

import pluggy

from ampd_plugin.costmodel import CostModel
from ampd_plugin.router_policy import spec
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route, SessionInfo, WorkerState

GROUP = "ampd_plugin.policies"


class PolicyError(RuntimeError):
    """A policy returned an invalid decision (or none where one is required)."""


def available_policies() -> list[str]:
    """Names of every installed policy, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def policy_class(name: str) -> type:
    """The class behind an installed policy name; ValueError listing the known names otherwise."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(available_policies()) or "(none installed)"
        raise ValueError(f"unknown policy {name!r}; known policies: {known}")
    return matches[0].load()


def policy_params(cls: type) -> dict[str, Any]:
    """The keyword parameters a policy class accepts, with their defaults."""
    params: dict[str, Any] = {}
    # Follow `**kwargs` up the class hierarchy so a subclass that forwards its base's parameters
    # still advertises them.
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        forwards = False
        for p in list(inspect.signature(init).parameters.values())[2:]:  # skip self, cost_model
            if p.kind == p.VAR_KEYWORD:
                forwards = True
            elif p.kind != p.VAR_POSITIONAL:
                params.setdefault(p.name, None if p.default is inspect.Parameter.empty else p.default)
        if not forwards:
            break
    return params


def load_policy(name: str, cost_model: CostModel, **params: Any) -> "PolicyRunner":
    """Build the policy registered as `name` with `params`, wrapped in a validating runner."""
    cls = policy_class(name)
    return build_runner(name, cls, cost_model, **params)


def build_runner(name: str, cls: type, cost_model: CostModel, **params: Any) -> "PolicyRunner":
    """Like `load_policy` for a class that is not (yet) installed as an entry point (tests, notebooks)."""
    accepted = policy_params(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"policy {name!r} does not accept parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
        )
    try:
        plugin = cls(cost_model, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy {name!r}: bad parameters: {exc}") from exc
    return PolicyRunner(name, plugin)


_KV_USE_STEPS = 16  # KV use is compared in 1/16ths of capacity, so near-equal workers tie


def least_loaded_decode(cluster: ClusterState) -> str | None:
    """Default binding: the live decode worker with the lowest KV use, ties by fewest bound sessions.

    KV use is settled only when a round ends, so sessions arriving together all see the same numbers;
    comparing it coarsely lets the binding count (which grows with each binding at once) spread a burst
    instead of herding it onto the worker whose estimate happened to be a few tokens lower.
    """
    live = cluster.live_decode()
    if not live:
        return None
    bound: dict[str, int] = {}
    for worker_id in cluster.bindings.values():
        bound[worker_id] = bound.get(worker_id, 0) + 1

    def key(w: WorkerState) -> tuple[int, int]:
        used = w.kv_used_estimate / w.kv_capacity_tokens if w.kv_capacity_tokens > 0 else 0.0
        return (int(used * _KV_USE_STEPS), bound.get(w.worker_id, 0))

    return min(live, key=key).worker_id


class PolicyRunner:
    """Calls a policy's hooks through pluggy and validates what comes back.

    Drivers use only these four methods. The runner also keeps `cluster.bindings` and `worker.queue`
    in step with the decisions, so the router and the simulator cannot diverge on that bookkeeping.
    """

    def __init__(self, name: str, plugin: Any) -> None:
        self.name = name
        self.plugin = plugin
        self.pm = pluggy.PluginManager(spec.PROJECT)
        self.pm.add_hookspecs(spec.PolicySpec)
        self.pm.register(plugin, name=name)
        self.hook = self.pm.hook
        # How long the workers' TTFT/ITL windows should be; drivers read it when creating WorkerStates.
        self.window_s: float = float(getattr(plugin, "window_s", 10.0))

    def __repr__(self) -> str:
        return f"PolicyRunner({self.name!r}, {self.plugin!r})"

    def bind_session(self, session: SessionInfo, cluster: ClusterState) -> str:
        """Bind `session` to a live decode worker (policy's choice, else least KV used) and record it."""
        worker_id = self.hook.bind_session(session=session, cluster=cluster)
        if worker_id is None:
            worker_id = least_loaded_decode(cluster)
            if worker_id is None:
                raise PolicyError(f"policy {self.name!r}: no live decode worker to bind session {session.session_id!r}")
        worker = cluster.decode.get(worker_id)
        if worker is None or not worker.alive:
            state = "dead" if worker is not None else "unknown"
            raise PolicyError(
                f"policy {self.name!r} bound session {session.session_id!r} to {state} decode worker {worker_id!r}"
            )
        cluster.bindings[session.session_id] = worker_id
        return worker_id

    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        """Where to run `task`: a validated Route to its live bound decode worker or a live prefill worker."""
        if task.decode_worker is None:
            task.decode_worker = cluster.bindings.get(task.session_id)
        if task.decode_worker is None:
            raise PolicyError(f"task of session {task.session_id!r} is not bound to a decode worker")
        route = self.hook.route_prefill(task=task, cluster=cluster)
        if not isinstance(route, Route):
            raise PolicyError(f"policy {self.name!r} returned {route!r} from route_prefill, not a Route")
        if route.kind == "local":
            if route.worker != task.decode_worker:
                raise PolicyError(
                    f"policy {self.name!r} routed session {task.session_id!r} locally to {route.worker!r}, "
                    f"but it is bound to {task.decode_worker!r}"
                )
            pool = cluster.decode
        elif route.kind == "remote":
            pool = cluster.prefill
        else:
            raise PolicyError(f"policy {self.name!r} returned route kind {route.kind!r}")
        worker = pool.get(route.worker)
        if worker is None:
            raise PolicyError(f"policy {self.name!r} routed to unknown {route.kind} worker {route.worker!r}")
        if not worker.alive:
            raise PolicyError(f"policy {self.name!r} routed to dead worker {route.worker!r}")
        return route

    def order_queue(self, worker: WorkerState, now: float) -> list[PrefillTask]:
        """Reorder `worker.queue` in place (FIFO when the policy has no opinion) and return it."""
        if len(worker.queue) < 2:
            return worker.queue
        order = self.hook.order_queue(worker=worker, now=now)
        if order is None:
            return worker.queue
        if len(order) != len(worker.queue) or {id(t) for t in order} != {id(t) for t in worker.queue}:
            raise PolicyError(
                f"policy {self.name!r} order_queue on {worker.worker_id!r} did not return a permutation of the queue"
            )
        worker.queue[:] = order
        return worker.queue

    def on_metrics(self, worker_id: str, kind: str, value: float, now: float) -> None:
        self.hook.on_metrics(worker_id=worker_id, kind=kind, value=value, now=now)
