"""Leases on exported blocks, from the reader's side: keep them alive while the read waits, and know
until when they are safe to read.

A holder pins exported blocks for ``lease_s`` (the descriptor carries ``expires`` and ``lease_s``) and
extends the pin by ``lease_s`` for every "renew" notice it receives before the lease lapses (up to its
``lease_max_s``). A reader may wait long before it reads: queued behind other requests, or its engine
paused. `LeaseKeeper` renews every tracked lease each ``lease_s / 3`` on its own thread (so a reader that
is not scheduled still renews) and keeps a *conservative* estimate of each lease's end:

- from the descriptor: the holder's ``expires`` (wall clock) minus ``skew_s`` for clock skew;
- from a renewal: the moment it was queued onto a live connection (ZMQ ``IMMEDIATE``) plus ``lease_s``
  — the holder receives it later and counts from then, so the real lease ends no earlier. A renewal
  counts only if it was sent before the current estimate ran out (a late one may find the pin gone).

The scheduler plans a read only while the estimate leaves room for the whole read, and the worker drops a
read that ends after it (`deadline`), so a lapsed lease means "compute locally", never stale KV.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from ampd_plugin.connector.params import SourceDescriptor

log = logging.getLogger("ampd_plugin.connector")

MAX_TRACKED = 4096
"""Leases tracked at most (a reader has at most one per waiting request; bounded regardless)."""


@dataclasses.dataclass
class _Lease:
    notify: str
    xfer: str
    lease_s: float
    ends: float            # conservative monotonic end of the lease
    last_renew: float      # monotonic time of the last renewal queued (or tracking start)
    renewals: int = 0


class LeaseKeeper:
    """Thread-safe table of the leases this engine's waiting reads depend on; `renew_due` sends renewals."""

    def __init__(self, send: Callable[[str, str], bool], *, skew_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._send, self._skew_s, self._clock, self._wall = send, skew_s, clock, wall
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._leases)

    def track(self, req_id: str, src: SourceDescriptor) -> None:
        """Start renewing ``src``'s lease for request ``req_id`` (idempotent)."""
        if src.expires is None or not src.lease_s:
            return
        now = self._clock()
        ends = now + (src.expires - self._wall()) - self._skew_s
        with self._lock:
            if req_id in self._leases:
                return
            if len(self._leases) >= MAX_TRACKED:
                oldest = min(self._leases, key=lambda k: self._leases[k].ends)
                del self._leases[oldest]
            self._leases[req_id] = _Lease(src.notify, src.xfer, src.lease_s, ends, last_renew=now)

    def untrack(self, req_id: str) -> int:
        """Stop renewing; return how many renewals were sent for it."""
        with self._lock:
            lease = self._leases.pop(req_id, None)
        return lease.renewals if lease else 0

    def deadline(self, req_id: str) -> float | None:
        """Monotonic time until which the lease is known to hold; None if not tracked (no lease info)."""
        with self._lock:
            lease = self._leases.get(req_id)
            return lease.ends if lease else None

    def renewals(self, req_id: str) -> int:
        with self._lock:
            lease = self._leases.get(req_id)
            return lease.renewals if lease else 0

    def renew_due(self) -> int:
        """Send a renewal for every lease due one (a third of its length since the last); return the count."""
        now = self._clock()
        with self._lock:
            due = [(k, l) for k, l in self._leases.items() if now - l.last_renew >= l.lease_s / 3 and now < l.ends]
        sent = 0
        for req_id, lease in due:
            at = self._clock()
            if not self._send(lease.notify, lease.xfer):
                continue  # retried next round; the estimate is not extended
            with self._lock:
                if self._leases.get(req_id) is lease and at < lease.ends:
                    lease.ends = max(lease.ends, at + lease.lease_s)
                    lease.last_renew = at
                    lease.renewals += 1
                    sent += 1
        return sent


class RenewalThread:
    """Calls ``tick`` every ``interval_s`` on a daemon thread until `stop`."""

    def __init__(self, tick: Callable[[], object], interval_s: float = 0.5):
        self._tick, self._interval_s = tick, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ampd-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - renewals must keep going
                log.exception("ampd: lease renewal round failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
