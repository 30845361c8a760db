"""In-process fake SGLang prefill/decode workers for the router's `--engine sglang` unit tests.

They extend `router_fakes.FakeEngine` (same deterministic "model", streaming, health, models) with
SGLang's PD handshake: every request must carry `bootstrap_host`/`bootstrap_port`/`bootstrap_room`; the
prefill registers its room with its own host and bootstrap port in a shared `Bootstrap` registry (as its
bootstrap server would); a decode request for a remote prefill waits (bounded) for that room and fails
if the host/port it was told do not match the prefill that registered — so a wrong address, a missing
concurrent prefill, or a dead prefill worker shows. A local request (sentinel host) is answered directly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web
from router_fakes import FakeEngine, RouterHarness

from ampd_plugin.connector.sglang.wire import AMPD_LOCAL_BOOTSTRAP_HOST


@dataclass
class Bootstrap:
    """What the prefill workers' bootstrap servers know: room -> (host, port), plus who waits for it."""

    rooms: dict[int, tuple[str, int]] = field(default_factory=dict)
    events: dict[int, asyncio.Event] = field(default_factory=dict)

    def event(self, room: int) -> asyncio.Event:
        return self.events.setdefault(room, asyncio.Event())

    def register(self, room: int, host: str, port: int) -> None:
        self.rooms[room] = (host, port)
        self.event(room).set()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "bootstrap", "code": status}}, status=status)


@dataclass
class FakeSGLangPrefill(FakeEngine):
    bootstrap: Bootstrap | None = None
    bootstrap_port: int = 8998
    arrivals: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    late_failure_s: float | None = None  # bootstrap the room, then fail this long after (decode already answering)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrivals.append(time.monotonic())
        if not all(k in body for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")):
            return _error(400, "prefill request without bootstrap fields")
        if body["bootstrap_port"] == self.bootstrap_port and body["bootstrap_host"] == "127.0.0.1":
            self.bootstrap.register(body["bootstrap_room"], "127.0.0.1", self.bootstrap_port)
        if self.late_failure_s is not None:
            await asyncio.sleep(self.late_failure_s)
            self.finished.append(time.monotonic())
            return _error(500, "prefill failed after the transfer began")
        try:
            return await super()._answer(request)
        finally:
            self.finished.append(time.monotonic())


@dataclass
class FakeSGLangDecode(FakeEngine):
    bootstrap: Bootstrap | None = None
    bootstrap_timeout: float = 1.0
    arrivals: list[float] = field(default_factory=list)
    bootstrap_failures: int = 0

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrivals.append(time.monotonic())
        room = body.get("bootstrap_room")
        if room is None:  # SGLang's decode server refuses requests without a room
            return _error(400, "decode request without bootstrap_room")
        if body.get("bootstrap_host") != AMPD_LOCAL_BOOTSTRAP_HOST:
            try:
                await asyncio.wait_for(self.bootstrap.event(room).wait(), self.bootstrap_timeout)
            except asyncio.TimeoutError:
                self.bootstrap_failures += 1
                return _error(500, f"no prefill bootstrapped room {room}")
            if self.bootstrap.rooms[room] != (body["bootstrap_host"], body["bootstrap_port"]):
                self.bootstrap_failures += 1
                return _error(500, f"room {room} was bootstrapped at {self.bootstrap.rooms[room]}")
        return await super()._answer(request)


class SGLangHarness(RouterHarness):
    """`RouterHarness` with fake SGLang workers and the router started with `engine: sglang`.

    Prefill worker i gets bootstrap port 9100+i (passed to the router as `bootstrap_ports`).
    """

    def __init__(self, n_prefill: int = 1, n_decode: int = 1, **kw) -> None:
        self.bootstrap = Bootstrap()
        ports = [9100 + i for i in range(n_prefill)]
        kw.setdefault("engine", "sglang")
        kw.setdefault("bootstrap_ports", ports)
        super().__init__(n_prefill=n_prefill, n_decode=n_decode, **kw)
        self.prefill = [FakeSGLangPrefill(f"P{i}", bootstrap=self.bootstrap, bootstrap_port=p) for i, p in enumerate(ports)]
        self.decode = [FakeSGLangDecode(f"D{i}", bootstrap=self.bootstrap) for i in range(n_decode)]
