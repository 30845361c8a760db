"""The policy's decisions for one round, turned into a plan: binding, route, and the two strategies
written on the primitives (context migration under KV pressure, balanced PD)."""

from __future__ import annotations

import logging
from typing import Callable

from ampd_plugin.router import primitives as prim
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.errors import RouterError
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.session_ids import for_log
from ampd_plugin.router.sessions import PromptCounter, Session
from ampd_plugin.router_policy.registry import PolicyError, PolicyRunner, least_loaded_decode
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route, SessionInfo, WorkerState

log = logging.getLogger("ampd.router")


class RoundPlanner:
    def __init__(self, cfg: RouterConfig, cluster: ClusterState, policy: PolicyRunner, metrics: RouterMetrics,
                 suspect: Callable[[str], bool] = lambda wid: False) -> None:
        self.cfg, self.cluster, self.policy, self.metrics = cfg, cluster, policy, metrics
        self.suspect = suspect  # a worker that failed since its last success (router/outliers.py)

    def bind(self, s: Session, prompt_tokens: int, reason: str) -> str:
        """The session's decode worker: the policy's choice, else the first live one (a policy bug)."""
        try:
            wid = self.policy.bind_session(SessionInfo(s.session_id, first_prompt_tokens=prompt_tokens), self.cluster)
        except PolicyError as exc:
            live = self.cluster.live_decode()
            if not live:
                raise RouterError(503, "no live decode worker", "no_worker") from None
            log.error("bind_session failed (%s); binding to %s", exc, live[0].worker_id)
            wid = live[0].worker_id
            self.cluster.bindings[s.session_id] = wid
        if self.suspect(wid):
            # Whatever the policy's reason, a new session does not start on a worker that is failing
            # while another one is not; among the healthy ones the default least-loaded rule decides.
            healthy = {w.worker_id: w for w in self.cluster.live_decode() if not self.suspect(w.worker_id)}
            if healthy:
                view = ClusterState(prefill=self.cluster.prefill, decode=healthy, bindings=self.cluster.bindings)
                alt = least_loaded_decode(view)
                log.warning("not binding %s to suspect worker %s; %s instead", s.session_id, wid, alt)
                wid = alt
                self.cluster.bindings[s.session_id] = wid
        if reason == "rebind":
            self.metrics.rebinds.labels("lost-worker").inc()
        return wid

    def plan(self, ctx: RoundCtx, task: PrefillTask, shape: prim.RoundShape,
             counter: PromptCounter) -> tuple[prim.Plan, Route]:
        """The policy's route, turned into steps (plus the two strategies: migration, balanced PD)."""
        d = self.cluster.decode[shape.decode]
        if self.cfg.kv_connector == "none":
            return prim.local_plan(shape), Route("local", shape.decode, "no-kv-connector")
        migrated = self._maybe_migrate(ctx, task, shape, d)
        if migrated is not None:
            return migrated
        try:
            route = self.policy.route_prefill(task, self.cluster)
        except PolicyError as exc:
            self.metrics.errors.labels("policy").inc()
            log.error("route_prefill failed: %s; running the prefill locally", for_log(exc))
            route = Route("local", shape.decode, "policy-error")
        if route.kind == "local":
            return prim.local_plan(shape), route
        share = self.cfg.balanced_pd_share
        if share > 0:
            ctx.token_ids = counter.token_ids(ctx.prompt)
            if ctx.token_ids is not None and len(ctx.token_ids) == ctx.prompt_tokens:
                return prim.balanced_pd_plan(shape, route.worker, share), route
        return prim.remote_plan(shape, route.worker), route

    def _maybe_migrate(self, ctx: RoundCtx, task: PrefillTask, shape: prim.RoundShape,
                       d: WorkerState) -> tuple[prim.Plan, Route] | None:
        """Context migration: the bound worker is short of KV memory for this round → move the session."""
        if not (self.cfg.migrate_on_kv_pressure and task.l_hist > 0 and d.kv_capacity_tokens > 0):
            return None
        need = task.l_incr + int(ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens") or 256)
        if d.kv_free_tokens >= need:
            return None
        others = [w for w in self.cluster.live_decode() if w.worker_id != d.worker_id and w.kv_free_tokens >= need + task.l_hist]
        if not others:
            return None
        new = max(others, key=lambda w: w.kv_free_tokens).worker_id
        self.cluster.bindings[ctx.session.session_id] = new
        self.metrics.rebinds.labels("kv-pressure").inc()
        task.decode_worker = ctx.decode = new
        plan = prim.migration_plan(prim.RoundShape(new, shape.prompt_tokens, shape.l_hist), d.worker_id)
        return plan, Route("local", new, f"migrate-from-{d.worker_id}")
