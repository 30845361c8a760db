"""Outlier ejection (a circuit breaker per worker): a worker whose requests keep failing leaves routing.

Why: `/health` only says the API server answers. A worker that answers 5xx, times out or stalls mid-stream
with a healthy `/health` would otherwise keep its sessions and, looking idle, attract new ones. Every
engine request's outcome is reported here; `failures` consecutive failures (5xx, timeout, stall, broken
stream) eject the worker: it is taken out exactly like a dead one (its sessions are rebound, its queue
re-routes) for a back-off that doubles with each ejection in a row (`base_s` .. `max_s`). When the back-off
is over the health check probes it back in *on probation*: the next request's outcome decides — success
closes the breaker and resets the back-off, one failure ejects it again (a worker on probation takes new
sessions: they are its probe, and a failed one is retried elsewhere). A worker that failed within the last
`base_s` and has not succeeded since is *suspect*: no new session binds to it while another worker is not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ampd_plugin.router.metrics import RouterMetrics

log = logging.getLogger("ampd.router")


@dataclass
class _Breaker:
    consecutive: int = 0  # failures since the last success
    ejections: int = 0  # ejections in a row (sets the back-off)
    ejected_until: float = 0.0
    probation: bool = False  # back from an ejection, not yet proven
    last_failure: float = float("-inf")


class OutlierDetector:
    def __init__(self, worker_ids: list[str], metrics: RouterMetrics, eject: Callable[[str, str], None], *,
                 failures: int = 3, base_s: float = 10.0, max_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics, self._eject, self._clock = metrics, eject, clock
        self.failures, self.base_s, self.max_s = failures, base_s, max_s
        self._b = {wid: _Breaker() for wid in worker_ids}

    def success(self, wid: str) -> None:
        b = self._b.get(wid)
        if b is None:
            return
        if b.probation:
            log.warning("worker %s passed probation; back in full service", wid)
        b.consecutive, b.ejections, b.probation = 0, 0, False

    def failure(self, wid: str, kind: str) -> None:
        """A request to `wid` failed (`kind`: 5xx, timeout, stall, broken); may eject the worker."""
        b = self._b.get(wid)
        if b is None:
            return
        self.metrics.worker_failures.labels(wid, kind).inc()
        b.consecutive += 1
        b.last_failure = self._clock()
        if self.ejected(wid):
            return
        if b.probation or b.consecutive >= self.failures:
            backoff = min(self.max_s, self.base_s * 2 ** b.ejections)
            b.ejections += 1
            b.ejected_until = self._clock() + backoff
            b.probation = False
            self.metrics.ejections.labels(wid).inc()
            log.warning("worker %s ejected for %.0f s after %d failure(s) in a row (last: %s)",
                        wid, backoff, b.consecutive, kind)
            self._eject(wid, f"ejected: {b.consecutive} failed requests in a row (last: {kind})")

    def ejected(self, wid: str) -> bool:
        b = self._b.get(wid)
        return b is not None and self._clock() < b.ejected_until

    def may_return(self, wid: str) -> bool:
        """Whether a healthy `/health` may bring `wid` back (not ejected, or its back-off is over: probation)."""
        b = self._b.get(wid)
        if b is None or b.ejected_until == 0.0:
            return True
        if self._clock() < b.ejected_until:
            return False
        b.ejected_until, b.probation = 0.0, True
        return True

    def suspect(self, wid: str) -> bool:
        """Ejected, or failed recently and not succeeded since: no new session should bind here."""
        b = self._b.get(wid)
        if b is None or b.probation:
            return False
        return self.ejected(wid) or (b.consecutive > 0 and self._clock() - b.last_failure < self.base_s)

    def ejected_count(self) -> int:
        return sum(1 for wid in self._b if self.ejected(wid))
