"""Where a router's cross-round state lives: in this process (one router), or in a store that several
router replicas share (`--state redis://…`, router/redis_store.py).

The router always keeps its working copy in memory (sessions, the KV ledger, the workers' measurement
windows): the policy reads them synchronously on the hot path. A shared store adds three things:
- **records**: per named session, what the next round needs on any replica (binding, KV residency,
  round count, a digest of the prompt the decode worker holds), read when a round starts;
- **a session lock** across replicas, so two replicas never run rounds of one session at once;
- **events**: every replica's TTFT/ITL samples and KV-ledger changes, applied by every other replica,
  so each one's view of a worker's load includes all replicas' traffic.

Writes never block a round: they are queued (bounded) and sent in batches; a round only waits for the
lock-and-record read when it starts. A store that is down degrades to local state (see `status`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass
class SessionRecord:
    """A named session as the shared store keeps it (times are wall-clock epoch seconds)."""

    version: int = 0  # incremented by every write (writes happen under the session lock)
    decode: str | None = None  # bound decode worker
    resident_worker: str | None = None
    resident_tokens: int = 0
    resident_until: float = 0.0  # wall clock; math.inf while a round is in flight
    rounds: int = 0
    prompt_len: int = 0  # characters of the last rendered prompt
    prompt_digest: str = ""  # text_digest of it
    prompt_tokens: int = 0
    held_len: int = 0  # characters of last prompt + generated text (what the decode worker holds)
    held_digest: str = ""


@dataclass(slots=True)
class Event:
    """One change another replica must apply: a latency sample or a KV-ledger entry."""

    kind: str  # "ttft" | "itl" | "kv"
    worker: str | None
    value: float = 0.0  # sample seconds | KV tokens
    at: float = 0.0  # wall clock: the sample's time | the residency's end (math.inf: in flight; 0: gone)
    session: str = ""
    explicit: bool = False


class StateStore(Protocol):
    backend: str  # "local" | "redis"

    async def start(self, on_event: Callable[[Event], None], on_resync: Callable[[], None] | None = None) -> None:
        """Connect (a store that is down is not an error: the router serves from local state); `on_event`
        gets other replicas' events, `on_resync` is called when the store is reachable again after an outage."""

    async def stop(self) -> None: ...

    async def enter(self, session_id: str, wait_s: float) -> SessionRecord | None:
        """Take the session's cross-replica lock (bounded wait: RouterError 409) and read its record
        (None: no record, or the store is unreachable)."""

    def leave(self, session_id: str) -> None:
        """Release the lock (queued after every write made before it)."""

    def write(self, session_id: str, record: SessionRecord, ttl_s: float) -> None: ...

    def publish(self, event: Event) -> None: ...

    def replicas(self) -> int:
        """Live router replicas sharing the store (this one included)."""

    def status(self) -> dict[str, Any]: ...


class LocalStore:
    """One router, nothing shared: every call is free and the record is always the local copy."""

    backend = "local"

    async def start(self, on_event: Callable[[Event], None], on_resync: Callable[[], None] | None = None) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def enter(self, session_id: str, wait_s: float) -> SessionRecord | None:
        return None

    def leave(self, session_id: str) -> None:
        return None

    def write(self, session_id: str, record: SessionRecord, ttl_s: float) -> None:
        return None

    def publish(self, event: Event) -> None:
        return None

    def replicas(self) -> int:
        return 1

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "connected": True, "replicas": 1}

