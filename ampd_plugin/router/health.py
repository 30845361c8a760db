"""Which workers are alive: health-check results applied to the cluster, and what a dead worker costs."""

from __future__ import annotations

import logging

from ampd_plugin.router.ledger import KVLedger
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.outliers import OutlierDetector
from ampd_plugin.router.queues import PrefillQueues
from ampd_plugin.router.sessions import SessionStore
from ampd_plugin.router.upstream import Endpoint, WorkerDown
from ampd_plugin.router_policy.state import ClusterState

log = logging.getLogger("ampd.router")


class WorkerHealth:
    def __init__(self, eps: dict[str, Endpoint], cluster: ClusterState, metrics: RouterMetrics,
                 queues: PrefillQueues, ledger: KVLedger, sessions: SessionStore, slow_checks_to_fail: int = 3) -> None:
        self.eps, self.cluster, self.metrics = eps, cluster, metrics
        self.queues, self.ledger, self.sessions = queues, ledger, sessions
        self.outliers: OutlierDetector | None = None  # set by the router; an ejected worker stays out
        # An engine busy with a long prefill on a shared CPU can miss one health deadline: only this many
        # unanswered checks in a row take it out (a refused connection or an error answer does at once).
        self.slow_checks_to_fail = max(1, slow_checks_to_fail)
        self._slow: dict[str, int] = {}

    def tick(self, result: dict[str, bool]) -> None:
        """One health round: apply it, drop residencies whose pin lapsed, forget sessions idle past their TTL."""
        self.apply(result)
        self.ledger.expire()
        for s in self.sessions.expire():
            self.ledger.forget(s)
        self.metrics.sessions.set(len(self.sessions))

    def apply(self, result: dict[str, bool | None]) -> None:
        """True: answered; False: refused or failed; None: did not answer within the health timeout."""
        for wid, ok in result.items():
            w = self.cluster.worker(wid)
            slow = self._slow.pop(wid, 0) + 1
            if ok is not None:
                slow = 0
            if slow:
                self._slow[wid] = slow
            if ok and not w.alive and (self.outliers is None or self.outliers.may_return(wid)):
                log.warning("worker %s (%s) is healthy again", wid, self.eps[wid].url)
                w.alive = True
                self.metrics.worker_up.labels(wid, w.kind).set(1)
            elif ok is False and w.alive:
                self.mark_dead(wid, "health check failed")
            elif ok is None and w.alive and slow >= self.slow_checks_to_fail:
                self.mark_dead(wid, f"no answer to {slow} health checks in a row")

    def mark_dead(self, wid: str, why: str) -> None:
        """Take a worker out of routing; its sessions lose their history and will be rebound."""
        w = self.cluster.worker(wid)
        if not w.alive:
            return
        log.warning("worker %s (%s) is down: %s", wid, self.eps[wid].url, why)
        w.alive = False
        self.metrics.worker_up.labels(wid, w.kind).set(0)
        self.metrics.errors.labels("worker_down").inc()
        if w.kind == "decode":
            lost = self.ledger.worker_lost(wid)
            if lost:
                self.metrics.rebinds.labels("worker_down").inc(len(lost))
        self.queues.fail_all(wid, WorkerDown(wid, why))
