"""AMPD's routing (paper Algorithm 1) and TTFT-aware queue reordering (paper Algorithm 2).

With default parameters this is the paper's policy. Two optional improvements (ARCHITECTURE §3.1 ★),
off by default so that `ampd` means the paper:

- `locality=True`: among prefill workers with TTFT slack, prefer the one that still caches the longest
  prefix of this session (instead of a purely random one), and in the cost-model fallback charge only the
  history the prefill worker does not already cache.
- `predictive=True`: a busy prefill worker has TTFT slack only if this task's predicted TTFT there (its
  queue, the running task's rest, the KV transfers and the prefill itself) is within α·SLO too — the
  windowed mean alone lags behind a queue that is building up; an idle worker always qualifies. Among
  the slack workers the one with the lowest predicted TTFT is taken (locality first when both are on).
Missing samples. A window with no recent sample is *unknown*, not slack. The rules:

- TTFT gate (step 1): a prefill worker with no recent TTFT sample has slack only if it is idle (nothing
  running, nothing queued: there is nothing to wait behind) or, when it has work, if this task's
  predicted TTFT there (Eq. 2: its queue, the running task's rest, the transfers, the prefill) is within
  α·SLO. An unknown busy worker is judged by the cost model rather than assumed free.
- ITL gate (step 2): a decode worker with no recent ITL sample has slack only if it is decoding nothing
  (no running round whose ITL a local prefill could hurt); a batch with unknown ITL is not slack, so
  the round goes to the cost-model fallback (step 3).

- `itl_aware=True`: price the damage a local prefill does to the decode batch it pauses. Local is
  refused when the paused batch's predicted ITL would break the SLO, and the fallback picks the option
  with the fewest predicted SLO violations (TTFT of this task, ITL of the paused rounds), then the fastest.
"""

from __future__ import annotations

import itertools
from typing import Any

from ampd_plugin.costmodel import CostModel
from ampd_plugin.router_policy.base import BasePolicy
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route, WorkerState


class AMPDPolicy(BasePolicy):
    """Parameters: `alpha` (TTFT slack, 0.9), `beta` (ITL slack, 0.85), `w` (reorder window, 3),
    `reorder` (Algorithm 2 on/off), `locality`, `itl_aware`, `output_tokens_hint` (initial guess of
    tokens per round for `itl_aware`, refined from "output_tokens" metrics), plus the BasePolicy ones.
    """

    def __init__(
        self,
        cost_model: CostModel,
        *,
        alpha: float = 0.9,
        beta: float = 0.85,
        w: int = 3,
        reorder: bool = True,
        locality: bool = False,
        predictive: bool = False,
        itl_aware: bool = False,
        output_tokens_hint: float = 64.0,
        **base: Any,
    ) -> None:
        super().__init__(cost_model, **base)
        if not 0 < float(alpha) <= 1 or not 0 < float(beta) <= 1:
            raise ValueError(f"alpha and beta must be in (0, 1], got {alpha}, {beta}")
        if int(w) < 1:
            raise ValueError(f"w must be >= 1, got {w}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.w = int(w)
        self.reorder = bool(reorder)
        self.locality = bool(locality)
        self.predictive = bool(predictive)
        self.itl_aware = bool(itl_aware)
        self.output_tokens = max(2.0, float(output_tokens_hint))
        self._perms = {k: list(itertools.permutations(range(k))) for k in range(1, self.w + 1)}

    # -- Algorithm 1 ----------------------------------------------------------------------------
    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        now = cluster.now
        session = task.session_id

        # 1. Any prefill worker with TTFT slack, in random order. Taking the first slack worker of a
        #    uniformly random order is the same as a uniform choice among the slack workers.
        gate = self.alpha * self.ttft_slo
        d = cluster.decode[task.decode_worker]
        slack = []
        for p in cluster.prefill.values():
            if p.alive:
                mean = p.ttft.mean(now)
                if mean is None:  # unknown: slack when idle, else when predicted within the gate
                    if (p.running is None and not p.queue) or self._t_remote(task, p, d, now) <= gate:
                        slack.append(p)
                elif mean <= gate:
                    slack.append(p)
        if slack and self.predictive:
            predicted = {p.worker_id: self._t_remote(task, p, d, now) for p in slack}
            # An idle worker stays eligible even for a task too long to meet the gate anywhere.
            slack = [p for p in slack if predicted[p.worker_id] <= gate or (p.running is None and not p.queue)]
        if slack:
            if self.locality:
                best = max(p.cached_prefix.get(session, 0) for p in slack)
                if best > 0:
                    slack = [p for p in slack if p.cached_prefix.get(session, 0) == best]
            if self.predictive:
                choice = min(slack, key=lambda p: predicted[p.worker_id])
            else:
                choice = slack[0] if len(slack) == 1 else slack[self.rng.randrange(len(slack))]
            return Route("remote", choice.worker_id, "ttft-slack")

        # 2. Decode worker with ITL slack: prefill locally.
        itl = d.itl.mean(now)
        t_local_pre = self.t_pre(task, d.layout)
        d_backlog = self.backlog(d, now)
        itl_slack = (not d.decoding) if itl is None else itl <= self.beta * self.itl_slo  # unknown batch ≠ slack
        if itl_slack:
            if not self.itl_aware or self._paused_itl(d, itl, t_local_pre + d_backlog) <= self.itl_slo:
                return Route("local", d.worker_id, "itl-slack")

        # 3. Fallback: the cheapest predicted completion (Eq. 1 and 2 of the paper). With itl_aware the
        #    key is (predicted SLO violations, time) instead of time alone. Ties keep local.
        t_local = t_local_pre + d_backlog
        violations = 0.0
        if self.itl_aware:
            violations = float(t_local > self.ttft_slo)
            if d.decoding and self._paused_itl(d, itl, t_local) > self.itl_slo:
                violations += d.decoding
        best_key = (violations, t_local)
        best_worker = None
        for p in cluster.prefill.values():
            if not p.alive:
                continue
            fixed_cost = self.t_remote_service(task, p, d, self.locality)
            if not self.itl_aware and fixed_cost >= best_key[1]:
                continue  # cannot beat the best even with an empty queue
            limit = float("inf") if self.itl_aware else best_key[1] - fixed_cost
            t_remote = fixed_cost + self.backlog(p, now, limit)
            key = (float(t_remote > self.ttft_slo) if self.itl_aware else 0.0, t_remote)
            if key < best_key:
                best_key, best_worker = key, p.worker_id
        if best_worker is None:
            return Route("local", d.worker_id, "cost-local")
        return Route("remote", best_worker, "cost-remote")

    def _t_remote(self, task: PrefillTask, p: WorkerState, d: WorkerState, now: float) -> float:
        """Eq. 2: predicted completion of `task` on prefill worker p (the remote round as p's backend runs
        it, plus p's queue)."""
        return self.t_remote_service(task, p, d, self.locality) + self.backlog(p, now)

    def _paused_itl(self, d: WorkerState, itl: float | None, pause: float) -> float:
        """Predicted ITL of d's running rounds if its batch pauses for `pause` seconds."""
        if not d.decoding:
            return 0.0
        return (itl or 0.0) + pause / (self.output_tokens - 1)

    @hookimpl
    def on_metrics(self, worker_id: str, kind: str, value: float, now: float) -> None:
        if kind == "output_tokens" and value >= 2:
            self.output_tokens += 0.05 * (float(value) - self.output_tokens)  # slow running mean

    # -- Algorithm 2 ----------------------------------------------------------------------------
    @hookimpl
    def order_queue(self, worker: WorkerState, now: float) -> list[PrefillTask] | None:
        """Best ordering of the first `w` tasks by number meeting the TTFT SLO; ties keep the order.

        A task already postponed `w` times may not be overtaken again (no starvation).
        """
        queue = worker.queue
        if not self.reorder or len(queue) < 2:
            return None
        window = queue[: self.w]
        k = len(window)
        layout = worker.layout
        durations = [self.t_pre(t, layout) for t in window]
        waited = [now - t.enqueue_time for t in window]
        start = self.running_remaining(worker, now)
        frozen = [t.postponed >= self.w for t in window]

        best_perm = None
        best_score = -1
        for perm in self._perms[k]:
            if any(frozen[i] and _overtaken(perm, i) for i in range(k)):
                continue
            clock = start
            score = 0
            for i in perm:
                clock += durations[i]
                if waited[i] + clock <= self.ttft_slo:
                    score += 1
            if score > best_score:  # strict: the identity (first) wins ties
                best_perm, best_score = perm, score
        if best_perm is None or list(best_perm) == list(range(k)):
            return None
        for i in range(k):
            if _overtaken(best_perm, i):
                window[i].postponed += 1
        return [window[i] for i in best_perm] + queue[k:]


def _overtaken(perm: tuple[int, ...], i: int) -> bool:
    """True when some task originally behind task i is placed before it in `perm`."""
    for j in perm:
        if j == i:
            return False
        if j > i:
            return True
    return False
