"""Keeps this replica's in-memory state and the shared store (router/state_store.py) in step.

Out: every KV-ledger change and every TTFT/TPOT sample becomes an event; every settled round of a named
session becomes its record (binding, residency, round count, digests of what was rendered and what the
decode worker holds). In: other replicas' events update the ledger, the bindings and the workers'
measurement windows, so the policy here sees every replica's traffic; a round's record, read under the
session's cross-replica lock, brings this replica's copy of the session up to date before the round is
counted and planned.

Clocks: events carry wall-clock times (replicas do not share a monotonic clock); they are converted to
this process's monotonic clock on arrival, so skew between hosts shifts samples by that skew.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.ledger import KVLedger
from ampd_plugin.router.sessions import Session, SessionStore, text_digest
from ampd_plugin.router.state_store import Event, LocalStore, SessionRecord, StateStore
from ampd_plugin.router_policy.state import ClusterState


def make_store(url: str | None, prefix: str = "ampd", replica_id: str | None = None,
               lock_ttl_s: float = 15.0) -> StateStore:
    """The store `--state` names: none = this process only; redis://… = shared with other replicas."""
    if not url:
        return LocalStore()
    from ampd_plugin.router.redis_store import RedisStore

    return RedisStore(url, prefix=prefix, replica_id=replica_id, lock_ttl_s=lock_ttl_s)


def to_wall(mono: float) -> float:
    return mono if math.isinf(mono) else time.time() - (time.monotonic() - mono)


def to_mono(wall: float) -> float:
    return wall if math.isinf(wall) else time.monotonic() - (time.time() - wall)


class Replication:
    def __init__(self, store: StateStore, cluster: ClusterState, ledger: KVLedger, sessions: SessionStore,
                 on_metrics: Callable, record_ttl_s: float, remote_inflight_s: float) -> None:
        self.store, self.cluster, self.ledger, self.sessions = store, cluster, ledger, sessions
        self.on_metrics = on_metrics  # the policy's hook: remote samples reach it like local ones
        self.record_ttl_s = record_ttl_s
        # Another replica's round in flight counts at most this long (that replica may die mid-round).
        self.remote_inflight_s = remote_inflight_s
        self.enabled = not isinstance(store, LocalStore)

    def attach(self, accounting) -> None:
        """Wire the hooks (only when replicas share a store: one router pays nothing)."""
        if not self.enabled:
            return
        self.ledger.on_change = self._kv_changed
        accounting.on_sample = self._sample
        accounting.on_settled = self.round_settled

    async def start(self) -> None:
        await self.store.start(self.apply, self.republish)

    # ------------------------------------------------------------------------------ out
    def _kv_changed(self, sid: str, explicit: bool, worker: str | None, tokens: int, until: float) -> None:
        self.store.publish(Event("kv", worker, float(tokens), to_wall(until) if worker else 0.0, sid, explicit))

    def _sample(self, kind: str, worker: str, seconds: float, now: float) -> None:
        self.store.publish(Event(kind, worker, seconds, to_wall(now)))

    def round_settled(self, ctx: RoundCtx) -> None:
        s = ctx.session
        s.synced_version += 1
        s.record_owner = True
        self.store.write(s.session_id, self._record(s), self.record_ttl_s)

    def _record(self, s: Session) -> SessionRecord:
        held = s.last_text + s.last_output
        until = self.ledger.until(s.session_id)
        return SessionRecord(
            version=s.synced_version, decode=self.cluster.bindings.get(s.session_id),
            resident_worker=s.resident_worker, resident_tokens=s.resident_tokens,
            resident_until=to_wall(until) if until is not None else 0.0, rounds=s.rounds,
            prompt_len=len(s.last_text), prompt_digest=text_digest(s.last_text) if s.last_text else "",
            prompt_tokens=s.last_text_tokens, held_len=len(held), held_digest=text_digest(held) if held else "")

    def republish(self) -> None:
        """After an outage: tell the other replicas what this one holds (their views may have drifted), and
        resend the records this replica wrote last (a restarted Redis lost them; an older one never wins)."""
        for sid, explicit, worker, tokens, until in self.ledger.entries():
            self._kv_changed(sid, explicit, worker, tokens, until)
        for s in self.sessions:
            if s.record_owner and not s.busy:
                self.store.write(s.session_id, self._record(s), self.record_ttl_s)

    # ------------------------------------------------------------------------------ in
    def merge(self, s: Session, rec: SessionRecord | None) -> None:
        """Bring `s` (about to run a round here, under the session's lock) up to date with its record."""
        if not self.enabled:
            return
        self.ledger.adopt(s)
        if rec is None or rec.version <= s.synced_version:
            return  # this replica wrote the newest record: its copy is current
        s.synced_version, s.record_owner = rec.version, False
        s.rounds = max(s.rounds, rec.rounds)
        w = self.cluster.decode.get(rec.decode or "")
        if w is not None and w.alive:
            self.cluster.bindings[s.session_id] = w.worker_id
        # The record was written when the session's last round settled, and no round ran since (we hold the
        # lock): its residency is the truth, newer than any event this replica applied.
        self.ledger.apply_remote(s.session_id, True, rec.resident_worker, rec.resident_tokens,
                                 to_mono(rec.resident_until), session=s)
        held = s.last_text + s.last_output
        same = (len(s.last_text) == rec.prompt_len and rec.prompt_digest == (text_digest(s.last_text) if s.last_text else "")
                and len(held) == rec.held_len and rec.held_digest == (text_digest(held) if held else ""))
        if not same:  # another replica served the last round: compare the next prompt by digest
            s.last_text, s.last_output, s.last_text_tokens = "", "", 0
            s.remote_prefix = (rec.prompt_len, rec.prompt_digest, rec.prompt_tokens) if rec.prompt_len else None
            s.remote_held = (rec.held_len, rec.held_digest) if rec.held_len and rec.prompt_len else None

    def apply(self, e: Event) -> None:
        """Another replica's event."""
        if e.kind == "kv":
            until = to_mono(e.at) if e.worker else 0.0
            if until == math.inf:
                until = time.monotonic() + self.remote_inflight_s
            self.ledger.apply_remote(e.session, e.explicit, e.worker, int(e.value), until)
            return
        if e.worker is None or (e.worker not in self.cluster.prefill and e.worker not in self.cluster.decode):
            return
        at = min(to_mono(e.at), time.monotonic())
        if e.kind == "ttft":
            self.cluster.record_ttft(e.worker, at, e.value)
        else:
            self.cluster.record_itl(e.worker, at, e.value)
        self.on_metrics(e.worker, e.kind, e.value, at)
