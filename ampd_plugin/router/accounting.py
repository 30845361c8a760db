"""What a finished round leaves behind: measurements for the policy, the KV ledger, metrics, the decision log."""

from __future__ import annotations

import logging
import time
from typing import Callable

import orjson

from ampd_plugin import slo
from ampd_plugin.costmodel import CostModel
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.ledger import KVLedger
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router_policy.registry import PolicyRunner
from ampd_plugin.router_policy.state import ClusterState

decisions = logging.getLogger("ampd.router.decisions")


class RoundAccounting:
    def __init__(self, cfg: RouterConfig, cluster: ClusterState, policy: PolicyRunner, cost_model: CostModel,
                 metrics: RouterMetrics, ledger: KVLedger) -> None:
        self.cfg, self.cluster, self.policy, self.cost_model = cfg, cluster, policy, cost_model
        self.metrics, self.ledger = metrics, ledger
        # (old decode worker, session): a migrated session's pin on the worker it left (router/retention.py)
        self.release_retention: Callable[[str, str], None] | None = None
        self.observers: list[Callable[[RoundCtx, float | None, float | None, int], None]] = []  # ok rounds
        # Router replicas (router/replication.py): every latency sample (kind, worker, seconds, when), and
        # every settled round, ok or not, for the shared session record.
        self.on_sample: Callable[[str, str, float, float], None] | None = None
        self.on_settled: Callable[[RoundCtx], None] | None = None

    def history_recomputed(self, ctx: RoundCtx, holder: str, tokens: int) -> None:
        """The connector reports that `holder` recomputed `tokens` of the session's history for an export:
        it had been evicted there. The residency goes (a later plan must not assume it), the cost shows in
        metrics and the decision log, and the policy is told (`on_metrics` kind "history_recomputed_tokens")."""
        if tokens <= 0:
            return
        ctx.recomputed += tokens
        self.metrics.recomputed.labels(holder).inc(tokens)
        if self.ledger.evict(ctx.session, holder):
            self.metrics.residency.labels("evicted").inc()
        self.policy.on_metrics(holder, "history_recomputed_tokens", float(tokens), time.monotonic())

    def first_token(self, ctx: RoundCtx, t_first: float, source: str) -> None:
        """TTFT, recorded the moment the first token reaches the router (once per round).

        It belongs to the worker that actually prefilled (`ctx.prefiller`): the prefill worker whose KV the
        decode worker used, else the decode worker itself (local plans, remote plans that fell back).
        """
        if ctx.ttft is not None:
            return
        ttft = max(0.0, t_first - ctx.t0)
        ctx.ttft, ctx.ttft_source = ttft, source
        now = time.monotonic()
        prefiller = ctx.prefiller
        self.cluster.record_ttft(prefiller, now, ttft)
        self.policy.on_metrics(prefiller, "ttft", ttft, now)
        if self.on_sample is not None:
            self.on_sample("ttft", prefiller, ttft, now)
        self.metrics.ttft.labels(prefiller, ctx.route.kind if ctx.route else "local").observe(ttft)

    def finish(self, ctx: RoundCtx, *, t_first: float | None, t_last: float | None, n_out: int, ok: bool) -> None:
        """The round is over: its TPOT sample, the KV the decode worker now holds, metrics, the decision log.

        TPOT is `slo.tpot(t_first, t_last, n_out)` for every round with two tokens or more, streaming or
        not (non-streaming: t_first is the TTFT instant, t_last the response's arrival, n_out from usage).
        """
        if ctx.accounted:
            return
        ctx.accounted = True
        now = time.monotonic()
        s, route, plan = ctx.session, ctx.route, ctx.plan
        if ok and t_first is not None:
            self.first_token(ctx, t_first, ctx.ttft_source or "stream")
        ttft = ctx.ttft
        tpot = slo.tpot(t_first, t_last, n_out) if (t_first is not None and t_last is not None) else None
        if ok and tpot is not None and not ctx.failovers:  # a failed-over stream's gap is not a step time
            self.cluster.record_itl(ctx.decode, now, tpot)
            self.policy.on_metrics(ctx.decode, "itl", tpot, now)
            if self.on_sample is not None:
                self.on_sample("itl", ctx.decode, tpot, now)
            self.metrics.itl.labels(ctx.decode).observe(tpot)
        if ok and n_out:
            self.policy.on_metrics(ctx.decode, "output_tokens", float(n_out), now)
        # what the decode worker now holds for this session: the prompt and the generated text
        self.ledger.settle(s, ctx.decode if ok and s.explicit else None, ctx.prompt_tokens + n_out)
        s.last_output = "".join(ctx.output) if ok and ctx.output is not None else ""
        if ok and plan is not None and plan.name == "migrate" and s.explicit and self.release_retention is not None:
            self.release_retention(plan.notes["from"], s.session_id)  # the worker it left keeps no pin
        if ok:
            for observe in self.observers:
                observe(ctx, ttft, tpot, n_out)
        s.rounds += 1
        if not s.explicit:
            self.cluster.unbind_session(s.session_id)
        elif self.on_settled is not None:
            self.on_settled(ctx)
        kv_bytes = plan.kv_tokens_moved * int(getattr(self.cost_model, "kv_bytes_per_token", 0) or 0) if plan else 0
        if kv_bytes and ok:
            self.metrics.kv_bytes.labels(plan.name).inc(kv_bytes)
        self.metrics.rounds.labels("true" if ctx.task and ctx.task.round_index == 0 else "false").inc()
        if route:
            self.metrics.routes.labels(route.kind, route.worker, route.reason or plan.name).inc()
        if not ok:
            self.metrics.errors.labels("round_failed").inc()
        if self.cfg.decision_log:
            decisions.info(orjson.dumps({
                "event": "round", "session": s.session_id, "round": ctx.task.round_index if ctx.task else None,
                "plan": plan.name if plan else None, "route": route.kind if route else None,
                "worker": route.worker if route else None, "decode": ctx.decode, "prefilled_on": ctx.prefiller,
                "reason": route.reason if route else None, "fallback": ctx.fallback or None,
                "l_hist": ctx.task.l_hist if ctx.task else None, "l_incr": ctx.task.l_incr if ctx.task else None,
                "history_recomputed": ctx.recomputed or None,
                "queue_wait_ms": round(ctx.queue_wait * 1e3, 3),
                "ttft_ms": round(ttft * 1e3, 3) if ttft is not None else None, "ttft_source": ctx.ttft_source or None,
                "tpot_ms": round(tpot * 1e3, 3) if tpot is not None else None,
                "out_tokens": n_out, "ok": ok, "failovers": ctx.failovers or None,
            }).decode())
