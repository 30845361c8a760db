"""What a routing policy sees: workers, their queues and windowed latencies, session bindings.

The live router and the simulator both keep one `ClusterState` up to date (from real streams or from
simulated events) and hand it to the policy. Nothing here does I/O, and time is always passed in
explicitly (`now`), so the same objects run on wall-clock time in the router and on simulated time in
the planner's simulator.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from ampd_plugin.costmodel.layout import Layout

PREFILL = "prefill"
DECODE = "decode"
WorkerKind = Literal["prefill", "decode"]


class WindowedMean:
    """Mean of the samples recorded in the last `window_s` seconds (AMPD uses 10 s)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        self._sum += value
        self._expire(now)

    def mean(self, now: float) -> float | None:
        """The windowed mean, or None when no sample is recent enough (an idle worker)."""
        self._expire(now)
        if not self._samples:
            return None
        return self._sum / len(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            _, value = self._samples.popleft()
            self._sum -= value
        if not self._samples:
            self._sum = 0.0


_task_ids = itertools.count()


@dataclass
class PrefillTask:
    """One prefill (initial or incremental) of one round of one session.

    `l_hist` is the history already resident on the session's decode worker (0 for a first round or
    after the history was lost); `l_incr` is what still has to be computed.
    """

    session_id: str
    round_index: int
    l_hist: int
    l_incr: int
    enqueue_time: float
    decode_worker: str | None = None
    task_id: str = field(default_factory=lambda: f"t{next(_task_ids)}")
    postponed: int = 0  # how many times Algorithm 2 let another task overtake this one
    # Set by the driver when the task starts executing; lets policies charge only its remaining time.
    started_at: float | None = None


@dataclass(frozen=True)
class Route:
    """A routing decision: prefill locally on the bound decode worker, or remotely on a prefill worker."""

    kind: Literal["local", "remote"]
    worker: str  # the decode worker id for "local", the prefill worker id for "remote"
    reason: str = ""  # which branch of the policy decided; logged and counted by the router


@dataclass
class WorkerState:
    """The policy-visible state of one engine replica."""

    worker_id: str
    kind: WorkerKind
    layout: Layout = Layout()
    alive: bool = True
    window_s: float = 10.0
    # Prefills waiting on this worker, head first (the router/simulator runs queue[0] next).
    queue: list[PrefillTask] = field(default_factory=list)
    # The prefill currently executing (prefill workers run one at a time), if any.
    running: PrefillTask | None = None
    # Decode workers: sessions in the running batch and KV memory, in tokens.
    decoding: int = 0
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    # Prefill workers: tokens of each session's prefix this worker still caches (locality, optional).
    cached_prefix: dict[str, int] = field(default_factory=dict)
    # What the engine itself reports (its /metrics, polled by the live router; None = not reported / no
    # engine, e.g. in the simulator): requests running and waiting, KV cache usage (0..1, pinned session
    # blocks included), prefix-cache hit rate since the previous poll (0..1).
    engine_running: int | None = None
    engine_waiting: int | None = None
    engine_kv_usage: float | None = None
    engine_prefix_hit_rate: float | None = None
    ttft: WindowedMean = field(init=False)
    itl: WindowedMean = field(init=False)

    def __post_init__(self) -> None:
        self.ttft = WindowedMean(self.window_s)
        self.itl = WindowedMean(self.window_s)

    @property
    def kv_used_estimate(self) -> int:
        """KV tokens in use: the engine's own report when it gives one (it sees pins, running requests and
        evictions), else the driver's ledger (resident sessions)."""
        if self.engine_kv_usage is not None and self.kv_capacity_tokens > 0:
            return int(self.engine_kv_usage * self.kv_capacity_tokens)
        return self.kv_used_tokens

    @property
    def kv_free_tokens(self) -> int:
        return max(0, self.kv_capacity_tokens - self.kv_used_estimate)


@dataclass
class SessionInfo:
    """What is known about a session when it is bound to a decode worker."""

    session_id: str
    first_prompt_tokens: int = 0
    expected_rounds: float | None = None
    expected_tokens: int | None = None  # expected final context length, if the workload knows it


@dataclass
class ClusterState:
    """All workers and session bindings. Drivers mutate it; policies read it (and may bind sessions)."""

    prefill: dict[str, WorkerState] = field(default_factory=dict)
    decode: dict[str, WorkerState] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)  # session id -> decode worker id
    now: float = 0.0

    def add_worker(self, worker: WorkerState) -> WorkerState:
        (self.prefill if worker.kind == PREFILL else self.decode)[worker.worker_id] = worker
        return worker

    def worker(self, worker_id: str) -> WorkerState:
        return self.prefill.get(worker_id) or self.decode[worker_id]

    def live_decode(self) -> list[WorkerState]:
        return [w for w in self.decode.values() if w.alive]

    def record_ttft(self, worker_id: str, now: float, seconds: float) -> None:
        self.worker(worker_id).ttft.add(now, seconds)

    def record_itl(self, worker_id: str, now: float, seconds: float) -> None:
        self.worker(worker_id).itl.add(now, seconds)

    def unbind_session(self, session_id: str) -> None:
        """Forget a finished session's binding (drivers call this at session end)."""
        self.bindings.pop(session_id, None)

    def unbind_worker(self, worker_id: str) -> list[str]:
        """Forget every binding to a (dead) decode worker; returns the sessions that must be rebound."""
        lost = [s for s, w in self.bindings.items() if w == worker_id]
        for session_id in lost:
            del self.bindings[session_id]
        return lost
