"""Which engine failures take a worker out of routing, and which do not.

A slow health answer is not death (only several in a row are), and the keep-alive race with uvicorn (the
engine closes an idle pooled connection just as the router reuses it) is retried on a new connection rather
than reported as a dead worker. The race is played by a real TCP server that drops a connection at its
second request without answering.
"""

from __future__ import annotations

import asyncio

import pytest

from policy_fakes import FakeCost
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.server import Router
from ampd_plugin.router.sessions import PromptCounter
from ampd_plugin.router.upstream import Endpoint, Upstreams, WorkerDown
from ampd_plugin.router_policy.registry import load_policy


def make_router(**cfg) -> Router:
    config = RouterConfig(prefill=["http://127.0.0.1:9100"], decode=["http://127.0.0.1:9200", "http://127.0.0.1:9201"],
                          decision_log=False, model="m", **cfg)
    cost = FakeCost()
    return Router(config, load_policy("ampd", cost, ttft_slo=config.ttft_slo, itl_slo=config.itl_slo), cost,
                  counter=PromptCounter(None))


def alive(router: Router) -> dict[str, bool]:
    return {wid: router.cluster.worker(wid).alive for wid in router.eps}


def test_slow_health_checks_take_a_worker_out_only_in_a_row() -> None:
    router = make_router(health_slow_checks=3)
    h = router.health_state
    for _ in range(2):
        h.apply({"decode-0": None, "decode-1": True, "prefill-0": None})
    assert all(alive(router).values())  # two missed deadlines: still serving
    h.apply({"decode-0": True, "decode-1": True, "prefill-0": True})  # an answer resets the count
    h.apply({"decode-0": None, "decode-1": True, "prefill-0": True})
    h.apply({"decode-0": None, "decode-1": True, "prefill-0": None})
    assert all(alive(router).values())
    h.apply({"decode-0": None, "decode-1": True, "prefill-0": None})
    assert alive(router) == {"prefill-0": True, "decode-0": False, "decode-1": True}
    h.apply({"decode-0": True, "decode-1": True, "prefill-0": True})
    assert all(alive(router).values())


def test_a_refused_health_check_takes_a_worker_out_at_once() -> None:
    router = make_router(health_slow_checks=3)
    router.health_state.apply({"decode-0": True, "decode-1": False, "prefill-0": True})
    assert alive(router) == {"prefill-0": True, "decode-0": True, "decode-1": False}


def test_health_slow_checks_is_validated() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="health_slow_checks"):
            RouterConfig(prefill=[], decode=["http://127.0.0.1:1"], health_slow_checks=bad).validate()


class DropsReusedConnections:
    """HTTP/1.1 server: answers the first request on a connection with keep-alive, then closes the
    connection without a word when a second request arrives on it (uvicorn's idle timeout, hit mid-reuse)."""

    def __init__(self) -> None:
        self.answered = 0
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if served:
                    self.dropped += 1
                    return
                served += 1
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n"
                             b"Connection: keep-alive\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_request_on_a_connection_the_engine_just_closed_is_sent_again() -> None:
    async def main() -> tuple[int, int, list[int]]:
        srv = DropsReusedConnections()
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ups = Upstreams({"decode-0": Endpoint("decode-0", "decode", f"http://127.0.0.1:{port}")},
                        connect_timeout_s=2, total_timeout_s=5, read_timeout_s=5, health_timeout_s=2)
        await ups.start()
        try:
            statuses = []
            for _ in range(3):  # each request after the first meets the pooled, now-closing connection
                status, _ = await ups.exchange("decode-0", "/v1/completions", b"{}", {"Content-Type": "application/json"})
                statuses.append(status)
            return srv.answered, srv.dropped, statuses
        finally:
            await ups.close()
            server.close()
            await server.wait_closed()

    answered, dropped, statuses = asyncio.run(main())
    assert statuses == [200, 200, 200]
    assert dropped >= 1  # the race really happened and was absorbed
    assert answered == 3


def test_a_refused_connection_is_not_retried() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens on `port` any more
        ups = Upstreams({"decode-0": Endpoint("decode-0", "decode", f"http://127.0.0.1:{port}")},
                        connect_timeout_s=2, total_timeout_s=5, read_timeout_s=5, health_timeout_s=2)
        await ups.start()
        try:
            with pytest.raises(WorkerDown):
                await ups.post("decode-0", "/v1/completions", b"{}", {})
            assert await ups.healthy("decode-0") is False
        finally:
            await ups.close()

    asyncio.run(main())
