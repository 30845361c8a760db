"""Pins on KV blocks that outlive their request: exported blocks waiting for a reader, and a session's
blocks retained on its decode worker between rounds.

A pin is one extra reference on each block (vLLM's block pool `touch`), dropped with `free_blocks`, so a
pinned block can neither be evicted nor reused, yet stays shareable by prefix-cache hits. Holding pins in
the scheduler (rather than delaying the request's own free) keeps an idle engine idle. Pure logic: the
pool operations are injected, so unit tests run without an engine.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

SOURCE = "source"   # exported for a reader; released by the reader's "done" notice or the TTL
RETAIN = "retain"   # a session's round on its decode worker; released by the session, TTL or pressure


@dataclasses.dataclass
class Hold:
    key: str
    kind: str
    blocks: Sequence[Any]
    deadline: float
    session: str | None = None
    created: float = 0.0


class HoldTable:
    def __init__(self, pin: Callable[[Sequence[Any]], None], unpin: Callable[[Sequence[Any]], None],
                 clock: Callable[[], float] = time.monotonic):
        self._pin, self._unpin, self._clock = pin, unpin, clock
        self._holds: dict[str, Hold] = {}
        self.expired: collections.Counter[str] = collections.Counter()  # holds released by their TTL, per kind

    def __len__(self) -> int:
        return len(self._holds)

    def __contains__(self, key: str) -> bool:
        return key in self._holds

    def kind(self, key: str) -> str | None:
        hold = self._holds.get(key)
        return hold.kind if hold else None

    def count(self, kind: str) -> int:
        return sum(1 for h in self._holds.values() if h.kind == kind)

    def add(self, key: str, kind: str, blocks: Sequence[Any], ttl_s: float, session: str | None = None) -> Hold:
        """Pin ``blocks`` under ``key`` (replacing an older pin with the same key)."""
        self.release(key)
        now = self._clock()
        self._pin(blocks)
        hold = Hold(key=key, kind=kind, blocks=list(blocks), deadline=now + ttl_s, session=session, created=now)
        self._holds[key] = hold
        return hold

    def release(self, key: str) -> bool:
        hold = self._holds.pop(key, None)
        if hold is None:
            return False
        # Tail blocks first: vLLM evicts the first-freed block first, keeping the shared prefix longest.
        self._unpin(list(reversed(hold.blocks)))
        return True

    def renew(self, key: str, ttl_s: float, max_age_s: float) -> bool:
        """Extend an export's lease to ``ttl_s`` from now (never beyond ``max_age_s`` after it was made)."""
        hold = self._holds.get(key)
        if hold is None or hold.kind != SOURCE:
            return False
        now = self._clock()
        hold.deadline = max(hold.deadline, min(now + ttl_s, hold.created + max_age_s))
        return True

    def remaining(self, key: str) -> float | None:
        hold = self._holds.get(key)
        return None if hold is None else hold.deadline - self._clock()

    def release_session(self, session: str, kind: str = RETAIN) -> int:
        keys = [k for k, h in self._holds.items() if h.session == session and h.kind == kind]
        for k in keys:
            self.release(k)
        return len(keys)

    def release_expired(self) -> list[str]:
        now = self._clock()
        keys = [k for k, h in self._holds.items() if h.deadline <= now]
        for k in keys:
            self.expired[self._holds[k].kind] += 1
            self.release(k)
        return keys

    def release_oldest(self, kind: str = RETAIN) -> str | None:
        candidates = [h for h in self._holds.values() if h.kind == kind]
        if not candidates:
            return None
        oldest = min(candidates, key=lambda h: h.created)
        self.release(oldest.key)
        return oldest.key

    def release_all(self) -> int:
        keys = list(self._holds)
        for k in keys:
            self.release(k)
        return len(keys)
