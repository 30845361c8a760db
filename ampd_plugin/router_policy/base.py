"""What every built-in policy shares: SLO parameters, cached cost predictions, backlog estimates, binding.

Kept apart from AMPD and the baselines so none of them depends on another, and so a third-party
policy can subclass it to get the same parameters and helpers.
"""

from __future__ import annotations

import random

from ampd_plugin.costmodel import CostModel, Layout
from ampd_plugin.costmodel.kv_pricing import remote_round_seconds
from ampd_plugin.router_policy.registry import least_loaded_decode
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, SessionInfo, WorkerState


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


class BasePolicy:
    """SLO thresholds, the TTFT/ITL window, a seeded RNG and cost-model helpers.

    Parameters: `ttft_slo`/`itl_slo` in seconds (the thresholds the policy aims for), `window_s` (how
    far back the workers' TTFT/ITL means look), `seed` (for any random choice).
    """

    def __init__(
        self,
        cost_model: CostModel,
        *,
        ttft_slo: float = 2.0,
        itl_slo: float = 0.1,
        window_s: float = 10.0,
        seed: int = 0,
    ) -> None:
        self.cost_model = cost_model
        self.ttft_slo = _positive("ttft_slo", ttft_slo)
        self.itl_slo = _positive("itl_slo", itl_slo)
        self.window_s = _positive("window_s", window_s)
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        # Decisions re-price the same (l_hist, l_incr) on the same layouts many times: one table of
        # predictions per layout, keyed by plain int tuples (cheap to hash, unlike the Layout dataclass).
        self._pre_tables: dict[tuple[int, int], dict[tuple[int, int], float]] = {}
        self._kv_table: dict[tuple[int, int, int, int, int], float] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ttft_slo={self.ttft_slo}, itl_slo={self.itl_slo})"

    # -- cost helpers -------------------------------------------------------------------------
    def _table(self, layout: Layout) -> dict[tuple[int, int], float]:
        key = (layout.tp, layout.pp)
        table = self._pre_tables.get(key)
        if table is None or len(table) > 1 << 16:
            table = self._pre_tables[key] = {}
        return table

    def _t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        table = self._table(layout)
        key = (l_hist, l_incr)
        value = table.get(key)
        if value is None:
            value = table[key] = self.cost_model.t_pre(l_hist, l_incr, layout)
        return value

    def t_pre(self, task: PrefillTask, layout: Layout) -> float:
        return self._t_pre(task.l_hist, task.l_incr, layout)

    def t_kv(self, tokens: int, src: Layout, dst: Layout) -> float:
        if tokens <= 0:
            return 0.0
        key = (tokens, src.tp, src.pp, dst.tp, dst.pp)
        value = self._kv_table.get(key)
        if value is None:
            if len(self._kv_table) > 1 << 16:
                self._kv_table.clear()
            value = self._kv_table[key] = self.cost_model.t_kv(tokens, src, dst)
        return value

    def t_remote_service(self, task: PrefillTask, p: WorkerState, d: WorkerState, locality: bool = True) -> float:
        """Service time of `task` as a remote round on p (no queue), as p's backend really runs it
        (`costmodel.kv_pricing.remote_round_seconds`): vLLM reads the history p lacks from d; SGLang
        recomputes it on p (its prefix cache always counts: it is what the engine does)."""
        cached = 0
        if locality or p.layout.backend == "sglang":
            cached = p.cached_prefix.get(task.session_id, 0)
            if p.layout.backend != "sglang":
                cached = min(task.l_hist, cached)
        return remote_round_seconds(task.l_hist, task.l_incr, cached, p.layout, d.layout, self._t_pre, self.t_kv)

    def backlog(self, worker: WorkerState, now: float, limit: float = float("inf")) -> float:
        """Predicted seconds of prefill work ahead of a new arrival: the running task's rest + the queue.

        Summing stops once the total exceeds `limit` (callers comparing against a best-so-far only need
        to know it is worse), which keeps decisions cheap when queues are long.
        """
        total = self.running_remaining(worker, now)
        if worker.queue:
            layout = worker.layout
            table = self._table(layout)
            get = table.get
            for queued in worker.queue:
                key = (queued.l_hist, queued.l_incr)
                value = get(key)
                if value is None:
                    value = table[key] = self.cost_model.t_pre(queued.l_hist, queued.l_incr, layout)
                total += value
                if total > limit:
                    break
        return total

    def running_remaining(self, worker: WorkerState, now: float) -> float:
        """Predicted seconds until the worker's running prefill (if any) finishes."""
        running = worker.running
        if running is None:
            return 0.0
        full = self._t_pre(running.l_hist, running.l_incr, worker.layout)
        if running.started_at is not None:
            full -= now - running.started_at
        return max(0.0, full)

    def least_backlog(self, cluster: ClusterState, now: float) -> WorkerState | None:
        """The live prefill worker with the least pending work (first in id order on ties)."""
        best, best_load = None, float("inf")
        for worker in cluster.prefill.values():
            if worker.alive:
                load = self.backlog(worker, now, best_load)
                if load < best_load or best is None:
                    best, best_load = worker, load
        return best

    def cache_aware_prefill(self, task: PrefillTask, cluster: ClusterState, now: float) -> WorkerState | None:
        """The live prefill worker with the least predicted work to finish this task, counting only the
        part of its prompt the worker does not cache (`cached_prefix`) plus its pending queue.

        The KV-aware prefill choice of Dynamo's router and llm-d's prefix-cache scorer: both weigh the
        prefix a worker already holds against its load. First in id order on ties.
        """
        best, best_cost = None, float("inf")
        total = task.l_hist + task.l_incr
        for worker in cluster.prefill.values():
            if not worker.alive:
                continue
            cached = min(total - 1, worker.cached_prefix.get(task.session_id, 0)) if total > 0 else 0
            compute = self._t_pre(max(0, cached), max(1, total - max(0, cached)), worker.layout)
            if compute >= best_cost:
                continue
            cost = compute + self.backlog(worker, now, best_cost - compute)
            if cost < best_cost or best is None:
                best, best_cost = worker, cost
        return best

    # -- hooks --------------------------------------------------------------------------------
    @hookimpl
    def bind_session(self, session: SessionInfo, cluster: ClusterState) -> str | None:
        """The paper's binding: the decode worker with the least KV memory in use."""
        return least_loaded_decode(cluster)
