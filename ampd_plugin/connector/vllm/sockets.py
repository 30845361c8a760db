"""A bounded cache of ZMQ PUSH sockets to peers' notify addresses.

Readers send "done"/"renew" notices to many holders over a process's life; holders come and go. Each
socket is kept while in use and closed when idle for ``idle_s`` or when ``capacity`` is exceeded (least
recently used first), so sockets to departed peers do not pile up. Not thread-safe: one owner thread.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

log = logging.getLogger("ampd_plugin.connector")


class PushSockets:
    def __init__(self, capacity: int = 64, idle_s: float = 300.0, *, immediate: bool = False,
                 clock: Callable[[], float] = time.monotonic, factory: Callable[[str, bool], object] | None = None):
        self._capacity, self._idle_s, self._immediate, self._clock = capacity, idle_s, immediate, clock
        self._factory = factory or _zmq_push
        self._socks: collections.OrderedDict[str, tuple[object, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._socks)

    def send(self, addr: str, payload: bytes) -> bool:
        """Queue ``payload`` for ``addr`` without blocking; False if it could not be queued (with
        ``immediate``: no live connection to the peer)."""
        self.prune()
        entry = self._socks.pop(addr, None)
        try:
            sock = entry[0] if entry else self._factory(addr, self._immediate)
        except Exception as exc:  # noqa: BLE001 - a bad address must not break the caller
            log.warning("ampd: cannot open a notify socket to %s: %s", addr, exc)
            return False
        self._socks[addr] = (sock, self._clock())
        while len(self._socks) > self._capacity:
            _, (old, _) = self._socks.popitem(last=False)
            old.close(0)
        try:
            import zmq

            sock.send(payload, zmq.NOBLOCK)
            return True
        except Exception as exc:  # noqa: BLE001 - zmq.Again (no peer) or a closed context
            log.debug("ampd: notice to %s not queued: %s", addr, exc)
            return False

    def prune(self) -> int:
        """Close sockets idle for longer than ``idle_s``; return how many."""
        now = self._clock()
        stale = [a for a, (_, used) in self._socks.items() if now - used > self._idle_s]
        for addr in stale:
            self._socks.pop(addr)[0].close(0)
        return len(stale)

    def close_all(self) -> None:
        for sock, _ in self._socks.values():
            sock.close(0)
        self._socks.clear()


def _zmq_push(addr: str, immediate: bool):
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 1000)
    if immediate:  # queue only onto completed connections: a send to an unreachable holder fails at once
        sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.connect(addr)
    return sock
