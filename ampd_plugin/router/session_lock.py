"""One session, one round at a time: a second concurrent round of a session waits (bounded), then 409.

Why serialise rather than race: a round's `l_hist` and the decode worker's KV residency are the previous
round's result; two rounds of one session in flight at once would both claim the same history and
settle it in whichever order they end. Waiting keeps the usual client pattern (a retry, or an agent that
fires its next call a moment early) working; a wait longer than `wait_s` means the first round is a long
one and the client is told so (409 `session_busy`) instead of queueing without bound.

The table holds only sessions with a round in flight or waiting, so it is bounded by the requests in
flight (entries are removed when their last holder leaves).
"""

from __future__ import annotations

import asyncio

from ampd_plugin.router.errors import RouterError


class SessionLocks:
    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # id -> (lock, [holders + waiters])

    def __len__(self) -> int:
        return len(self._locks)

    async def acquire(self, session_id: str) -> None:
        """Wait for the session's previous round to end; RouterError 409 after `wait_s`."""
        entry = self._locks.get(session_id)
        if entry is None:
            entry = self._locks[session_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            await asyncio.wait_for(lock.acquire(), self.wait_s)
        except asyncio.TimeoutError:
            self._leave(session_id)
            raise RouterError(409, f"another round of session {session_id!r} is still running; "
                                   "send the next round when it has finished", "session_busy") from None
        except BaseException:
            self._leave(session_id)
            raise

    def release(self, session_id: str) -> None:
        entry = self._locks.get(session_id)
        if entry is None:
            return
        if entry[0].locked():
            entry[0].release()
        self._leave(session_id)

    def _leave(self, session_id: str) -> None:
        entry = self._locks.get(session_id)
        if entry is not None:
            entry[1][0] -= 1
            if entry[1][0] <= 0:
                del self._locks[session_id]
