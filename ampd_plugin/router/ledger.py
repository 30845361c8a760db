"""The KV ledger: which decode worker holds which session's KV, how many tokens of it, and until when.

Two views must agree: each `Session` remembers its `resident_worker`/`resident_tokens` (the next round's
`l_hist`), and each decode `WorkerState.kv_used_tokens` sums what the ledger's entries hold (what
policies and migration read). Every change of residency goes through here, so the two cannot drift apart.

What counts, following what the `ampd` connector really does:
- a round in flight counts on its decode worker from dispatch (`begin`) until it ends (`settle`);
- a finished round's KV stays resident for the connector's retention TTL (`retention_ttl_s` in the
  engine's `kv_connector_extra_config`, reported on its /metrics; the connector's default until a worker
  reports one, or the operator's `residency_ttl_s`). After that the pin has lapsed, the blocks are
  evictable and the router no longer assumes the history is cached there;
- an eviction the connector reports (a history it had to recompute) drops the residency at once.

One entry per session with a round in flight or KV resident: the table is bounded by the requests in
flight plus the sessions served within one retention TTL.

With router replicas (router/replication.py) every change made here is reported through `on_change`, and
other replicas' changes come in through `apply_remote`; a session this replica has never served is held
by a stand-in `Session` that is not in the session store (its binding goes with its residency).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from ampd_plugin.router.sessions import Session, SessionStore
from ampd_plugin.router_policy.state import ClusterState

CONNECTOR_DEFAULT_RETENTION_S = 300.0  # connector/vllm/config.py `retention_ttl_s` default


@dataclass
class _Entry:
    session: Session
    worker: str
    tokens: int
    until: float  # math.inf while the round is in flight


class KVLedger:
    def __init__(self, cluster: ClusterState, sessions: SessionStore, residency_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.sessions = sessions
        self.residency_ttl_s = residency_ttl_s  # the operator's figure; None = follow the engines
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._retention: dict[str, float] = {}  # decode worker -> retention TTL its connector reported
        self.expired = 0  # residencies that lapsed with the connector's pin
        self.evicted = 0  # residencies dropped because the connector reported an eviction
        # (session, explicit, worker or None, tokens, until): every local change, for other replicas
        self.on_change: Callable[[str, bool, str | None, int, float], None] | None = None

    # ------------------------------------------------------------------------------ retention
    def retention_s(self, worker_id: str) -> float:
        """How long `worker_id` keeps a finished round's KV pinned."""
        if self.residency_ttl_s is not None:
            return self.residency_ttl_s
        return self._retention.get(worker_id, CONNECTOR_DEFAULT_RETENTION_S)

    def learn_retention(self, worker_id: str, ttl_s: float | None) -> None:
        """The engine's connector reported its retention TTL (None: it did not say)."""
        if ttl_s is not None and math.isfinite(ttl_s) and ttl_s >= 0 and worker_id in self.cluster.decode:
            self._retention[worker_id] = float(ttl_s)

    # ------------------------------------------------------------------------------ rounds
    def history(self, s: Session, worker_id: str) -> int:
        """Tokens of `s` resident on `worker_id` now (0 when elsewhere, lapsed or unknown)."""
        e = self._entries.get(s.session_id)
        if s.resident_worker != worker_id or not s.resident_tokens:
            return 0
        if e is not None and e.until <= self._clock():
            self._lapse(s)
            return 0
        return s.resident_tokens

    def begin(self, s: Session, worker_id: str, tokens: int) -> None:
        """A round of `s` is dispatched to decode worker `worker_id`: its KV counts there from now on (the
        session's history on that worker is a prefix of it, so it replaces the resident entry)."""
        self._set(s.session_id, _Entry(s, worker_id, max(0, tokens), math.inf))

    def settle(self, s: Session, worker_id: str | None, tokens: int) -> None:
        """After a round: `s` now holds `tokens` on `worker_id` (None: nothing is kept anywhere)."""
        if worker_id is None or tokens <= 0:
            self._set(s.session_id, None)
            s.resident_tokens, s.resident_worker = 0, None
            return
        self._set(s.session_id, _Entry(s, worker_id, tokens, self._clock() + self.retention_s(worker_id)))
        s.resident_tokens, s.resident_worker = tokens, worker_id

    def evict(self, s: Session, worker_id: str) -> bool:
        """The connector reported that `worker_id` no longer cached `s`'s history: drop that residency."""
        if s.resident_worker != worker_id:
            return False
        e = self._entries.get(s.session_id)
        if e is not None and e.worker == worker_id and e.until != math.inf:
            self._set(s.session_id, None)
        s.resident_tokens, s.resident_worker = 0, None
        self.evicted += 1
        return True

    def forget(self, s: Session) -> None:
        """An expired session: its KV no longer counts and its binding goes (here only: with replicas the
        shared record's TTL ends it everywhere)."""
        self._set(s.session_id, None, publish=False)
        self.cluster.unbind_session(s.session_id)

    def expire(self, now: float | None = None) -> list[str]:
        """Residencies whose retention TTL has passed (the connector's pin lapsed); returns their sessions."""
        now = self._clock() if now is None else now
        gone = [e.session for e in self._entries.values() if e.until <= now]
        for s in gone:
            self._lapse(s)
        return [s.session_id for s in gone]

    def worker_lost(self, worker_id: str) -> list[str]:
        """A decode worker died: its sessions lose their history and binding; returns the unbound sessions."""
        lost = self.cluster.unbind_worker(worker_id)
        self.sessions.on_worker_lost(worker_id)
        for sid in [sid for sid, e in self._entries.items() if e.worker == worker_id]:
            del self._entries[sid]
        self.cluster.decode[worker_id].kv_used_tokens = 0
        return lost

    # ------------------------------------------------------------------------------ replicas
    def apply_remote(self, session_id: str, explicit: bool, worker: str | None, tokens: int, until: float,
                     session: Session | None = None) -> bool:
        """Another replica changed this session's residency (`until` on this process's clock). Ignored while
        a round of the session runs here (this replica owns it then) or for a worker unknown here."""
        e = self._entries.get(session_id)
        s = session or self.sessions.peek(session_id) or (e.session if e is not None else None) \
            or Session(session_id, explicit)
        if s.busy:
            return False
        s.last_seen = time.monotonic()  # served elsewhere is not idle: this copy must not expire meanwhile
        if worker is None or tokens <= 0 or worker not in self.cluster.decode or until <= self._clock():
            self._set(session_id, None, publish=False)
            s.resident_tokens, s.resident_worker = 0, None
            if self.sessions.peek(session_id) is not s and e is not None:
                self.cluster.unbind_session(session_id)  # a stand-in: nothing else keeps its binding
            return True
        self._set(session_id, _Entry(s, worker, tokens, until), publish=False)
        self.cluster.bindings[session_id] = worker
        if until != math.inf:
            s.resident_tokens, s.resident_worker = tokens, worker
        return True

    def adopt(self, s: Session) -> bool:
        """`s` is this replica's copy of a session whose entry another replica made: the entry is `s`'s now."""
        e = self._entries.get(s.session_id)
        if e is None or e.session is s:
            return e is not None
        e.session = s
        if e.until != math.inf:
            s.resident_tokens, s.resident_worker = e.tokens, e.worker
        return True

    def entries(self) -> list[tuple[str, bool, str, int, float]]:
        """(session, explicit, worker, tokens, until) of every entry (a replica resynchronising sends them)."""
        return [(sid, e.session.explicit, e.worker, e.tokens, e.until) for sid, e in self._entries.items()]

    def until(self, session_id: str) -> float | None:
        e = self._entries.get(session_id)
        return e.until if e is not None else None

    # ------------------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self._entries)

    def in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.until == math.inf)

    def tokens_on(self, worker_id: str) -> int:
        return sum(e.tokens for e in self._entries.values() if e.worker == worker_id)

    # ------------------------------------------------------------------------------ internals
    def _lapse(self, s: Session) -> None:
        self._set(s.session_id, None, publish=False)  # every replica lapses it on its own clock
        s.resident_tokens, s.resident_worker = 0, None
        if self.sessions.peek(s.session_id) is not s:
            self.cluster.unbind_session(s.session_id)  # a stand-in for another replica's session
        self.expired += 1

    def _set(self, sid: str, entry: _Entry | None, publish: bool = True) -> None:
        if publish and self.on_change is not None:
            e = entry
            self.on_change(sid, e.session.explicit if e else True, e.worker if e else None, e.tokens if e else 0,
                           e.until if e else 0.0)
        old = self._entries.pop(sid, None)
        if old is not None and old.worker in self.cluster.decode:
            w = self.cluster.decode[old.worker]
            w.kv_used_tokens = max(0, w.kv_used_tokens - old.tokens)
        if entry is not None and entry.worker in self.cluster.decode:
            self._entries[sid] = entry
            self.cluster.decode[entry.worker].kv_used_tokens += entry.tokens
