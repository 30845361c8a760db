"""Open-loop session arrivals for Locust: sessions start at their scheduled (Poisson) times.

Locust normally runs closed-loop users (a fixed number, each looping). Multi-round SLO tests need
open-loop *session* arrivals — a session rate, not a user count — or a slow server would slow the
arrivals down and hide its own overload. So the workload (from `ampd_plugin.workload`, whose arrival
times are Poisson at `--session-rate`, or come from a trace) is a shared schedule; each Locust user is a
slot that takes the next session, sleeps until the session's arrival time, and plays it. With as many
users as sessions (the default of `ampd-plugin loadtest`) each user plays exactly one session and no
session ever starts late; with fewer, a session that arrives while every user is busy starts late, and
the delay is recorded (`late_start`) and reported rather than silently turned into a lower rate.

In distributed mode every Locust process loads the same workload (same seed) and plays only the
sessions whose index ≡ its worker index (mod the number of workers), which the master sends at test start.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Sequence

DEFAULT_SESSIONS, DEFAULT_RATE = 20, 0.5


def build_sessions(source: str, sessions: int | None = None, rate: float | None = None, seed: int = 0,
                   input_scale: float = 1.0, output_scale: float = 1.0, max_rounds: int = 0,
                   is_trace: bool = False) -> list:
    """The workload from ampd_plugin.workload, with optional length scaling and a round cut.

    A profile defaults to DEFAULT_SESSIONS sessions at DEFAULT_RATE sessions/s; a trace to all of its
    sessions at its own arrival times (a rate re-draws Poisson arrivals, keeping the tool delays).
    """
    from ampd_plugin.workload import PROFILES, load_workload

    is_trace = is_trace or str(source).lower() not in PROFILES
    out = load_workload(
        source,
        sessions=sessions if (sessions or is_trace) else DEFAULT_SESSIONS,
        rate=rate if (rate or is_trace) else DEFAULT_RATE,
        seed=seed,
    )
    return [scale_session(s, input_scale, output_scale, max_rounds) for s in out]


def scale_session(session, input_scale: float = 1.0, output_scale: float = 1.0, max_rounds: int = 0):
    """A copy of a session with scaled lengths (each ≥ 1 token) and at most max_rounds rounds."""
    rounds = list(session.rounds)[: max_rounds or None]
    if input_scale != 1.0 or output_scale != 1.0:
        rounds = [
            dataclasses.replace(
                r,
                input_tokens=max(1, round(r.input_tokens * input_scale)),
                output_tokens=max(1, round(r.output_tokens * output_scale)),
            )
            for r in rounds
        ]
    if rounds and rounds[-1].tool_delay_s:
        rounds[-1] = dataclasses.replace(rounds[-1], tool_delay_s=0.0)
    return dataclasses.replace(session, rounds=rounds)


@dataclass
class Shard:
    index: int = 0
    count: int = 1


class SessionSchedule:
    """Hands out this process's share of the sessions in arrival order; thread- and greenlet-safe."""

    def __init__(self, sessions: Sequence, shard: Shard | None = None) -> None:
        shard = shard or Shard()
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ValueError(f"bad shard {shard.index}/{shard.count}")
        ordered = sorted(sessions, key=lambda s: s.arrival_s)
        self.sessions = [s for i, s in enumerate(ordered) if i % shard.count == shard.index]
        self._next = 0
        self._active = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sessions)

    def take(self):
        """The next session to play (and mark it active), or None when all were handed out."""
        with self._lock:
            if self._next >= len(self.sessions):
                return None
            session = self.sessions[self._next]
            self._next += 1
            self._active += 1
            return session

    def finish(self) -> bool:
        """Mark one taken session finished; True when every session has been played."""
        with self._lock:
            self._active -= 1
            return self._next >= len(self.sessions) and self._active == 0

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._next >= len(self.sessions) and self._active == 0

    @property
    def started(self) -> int:
        return self._next
