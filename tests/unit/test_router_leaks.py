"""Nothing the router holds outlives its round: 10,000 rounds with injected failures, then every table is empty.

The rounds run through the real router (intake of a round, binding, planning, queues, executor, relay,
accounting, ledger, session locks, retention releases); only the engines' transport is replaced by an
in-process fake (`ChaosUpstreams`), so ten thousand rounds take seconds. Each engine request may answer
5xx or 4xx, refuse the connection, time out, stall or break mid-stream; clients may disconnect while
queued, mid-prefill or mid-stream. The same counts are checked over real HTTP with fake engines in
`test_router_kv_signals.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

import aiohttp
import orjson
import pytest
from policy_fakes import FakeCost

from ampd_plugin.connector import params as wire
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.errors import RouterError
from ampd_plugin.router.relay import RelayResponse
from ampd_plugin.router.server import Router
from ampd_plugin.router.sessions import PromptCounter
from ampd_plugin.router.upstream import UpstreamTimeout, WorkerDown
from ampd_plugin.router_policy.registry import load_policy

MODEL = "fake-model"
FAULTS = ("ok",) * 40 + ("500", "400", "timeout", "stall", "broken") * 2 + ("down",)


class FakeContent:
    def __init__(self, chunks: list[bytes], fault: str | None) -> None:
        self.chunks, self.fault = chunks, fault

    async def iter_any(self):
        for i, c in enumerate(self.chunks):
            if self.fault and i == 2:
                raise asyncio.TimeoutError() if self.fault == "stall" else aiohttp.ClientPayloadError("reset")
            await asyncio.sleep(0)
            yield c


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"", chunks: list[bytes] | None = None, fault: str | None = None):
        self.status, self.body = status, body
        self.headers = {"content-type": "text/event-stream" if chunks is not None else "application/json"}
        self.content_type = self.headers["content-type"]
        self.content = FakeContent(chunks or [], fault)
        self.released = self.closed = False

    async def read(self) -> bytes:
        return self.body

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class ChaosUpstreams:
    """The engines, in process: every request draws a fault from `rng`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.requests = 0
        self.releases = 0

    def _fault(self) -> str:
        return self.rng.choice(FAULTS)

    @staticmethod
    def _answer(body: dict, n: int) -> dict:
        ampd = (body.get("kv_transfer_params") or {}).get("ampd") or {}
        kv = None
        if ampd.get("role") == "prefill":
            src = wire.SourceDescriptor(engine="P", te="127.0.0.1:7000", notify="tcp://127.0.0.1:7001",
                                        xfer=ampd["xfer"], blocks=(0, 1), tokens=16, block_size=16, block_bytes=64,
                                        bases=(4096,))
            kv = wire.response_params(source=src, stats={"read_bytes": 128})
        return {"id": "x", "object": "chat.completion", "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " w" * n}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}, "kv_transfer_params": kv}

    async def post(self, worker_id, path, data, headers, timeout=None):
        self.requests += 1
        await asyncio.sleep(0)
        body = orjson.loads(data)
        if body.get("prompt") == [0]:
            self.releases += 1
        fault = self._fault()
        if fault == "down" and worker_id.startswith("decode"):
            # A dead decode worker takes all its sessions' state with it, which would hide a leak: decode
            # deaths are tested elsewhere; here decode workers fail in every other way.
            fault = "500"
        if fault == "down":
            raise WorkerDown(worker_id, "connection refused")
        if fault == "timeout":
            raise UpstreamTimeout(worker_id)
        if fault in ("500", "400"):
            return FakeResponse(int(fault), b'{"error": {"message": "injected", "type": "x", "code": 1}}')
        n = int(body.get("max_tokens") or 4)
        if body.get("stream"):
            chunks = [b'data: {"choices":[{"index":0,"delta":{"content":" w"}}]}\n\n' for _ in range(n)]
            chunks.append(b"data: [DONE]\n\n")
            return FakeResponse(200, chunks=chunks, fault=fault if fault in ("stall", "broken") else None)
        resp = FakeResponse(200, orjson.dumps(self._answer(body, n)))
        resp.fault = fault if fault in ("stall", "broken") else None
        return resp

    async def read_body(self, worker_id, resp, what="response"):
        await asyncio.sleep(0)
        if getattr(resp, "fault", None) == "stall":
            raise UpstreamTimeout(worker_id)
        if getattr(resp, "fault", None) == "broken":
            raise WorkerDown(worker_id, "reset")
        return await resp.read()

    async def exchange(self, worker_id, path, data, headers, what="response", timeout=None):
        resp = await self.post(worker_id, path, data, headers, timeout)
        return resp.status, await self.read_body(worker_id, resp, what)


def make_router(policy: str, n_decode: int, **cfg) -> tuple[Router, ChaosUpstreams]:
    config = RouterConfig(prefill=[f"http://127.0.0.1:{9100 + i}" for i in range(2)],
                          decode=[f"http://127.0.0.1:{9200 + i}" for i in range(n_decode)], decision_log=False,
                          model=MODEL, eject_base_s=0.001, eject_max_s=0.002, session_wait_s=5.0, **cfg)
    cost = FakeCost()
    router = Router(config, load_policy(policy, cost, ttft_slo=config.ttft_slo, itl_slo=config.itl_slo), cost,
                    counter=PromptCounter(None))
    chaos = ChaosUpstreams(random.Random(7))
    router.io.upstreams = chaos
    router.retention.upstreams = chaos
    return router, chaos


async def consume(resp, disconnect_after: int | None) -> None:
    """Play uvicorn's part for a streamed response; the client may hang up after some chunks."""
    sent = 0
    gone = asyncio.Event()

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal sent
        sent += 1
        if disconnect_after is not None and sent >= disconnect_after:
            gone.set()
            await asyncio.sleep(0)

    await resp({"type": "http"}, receive, send)


async def drive(router: Router, rounds: int, rng: random.Random, concurrency: int = 24) -> dict:
    outcomes: dict[str, int] = {}
    conversations: dict[str, list] = {}
    todo = iter(range(rounds))

    async def one(i: int) -> None:
        named = rng.random() < 0.7
        sid = f"s{rng.randrange(400)}" if named else None
        turn = {"role": "user", "content": f"turn {i} " + "x " * rng.randrange(1, 200)}
        history = conversations.get(sid, []) + [turn] if sid else [turn]
        if sid:  # a named session's next round extends its history (until it restarts)
            conversations[sid] = [] if len(history) > 8 else history + [{"role": "assistant", "content": " w"}]
        body = {"model": MODEL, "messages": history, "max_tokens": rng.randrange(1, 6), "stream": rng.random() < 0.5}
        headers = {"x-session-id": sid} if sid else {}
        cancel_at = rng.choice((None,) * 6 + (0, 1, 3))  # a client that leaves while queued / prefilling
        task = asyncio.ensure_future(router.rounds.run(headers, body, True, time.monotonic()))
        try:
            if cancel_at is not None:
                for _ in range(cancel_at):
                    await asyncio.sleep(0)
                task.cancel()
            resp = await task
            if isinstance(resp, RelayResponse):
                await consume(resp, rng.choice((None, None, 1, 3)))
            outcomes[str(resp.status_code)] = outcomes.get(str(resp.status_code), 0) + 1
        except asyncio.CancelledError:
            outcomes["cancelled"] = outcomes.get("cancelled", 0) + 1
        except RouterError as e:
            outcomes[str(e.status)] = outcomes.get(str(e.status), 0) + 1
        if i % 23 == 0:  # the health loop: dead workers come back, lapsed residencies go
            router.health_state.apply({wid: True for wid in router.eps})
            router.ledger.expire()

    async def worker() -> None:
        for i in todo:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    for _ in range(50):  # background releases end
        if not len(router.retention):
            break
        await asyncio.sleep(0.01)
    return outcomes


def held(router: Router) -> dict:
    c = router.cluster
    workers = list(c.prefill.values()) + list(c.decode.values())
    return {
        "anonymous_bindings": sum(1 for sid in c.bindings if sid.startswith("anon-")),
        "rounds_in_flight": router.ledger.in_flight(),
        "queued": sum(len(w.queue) for w in workers),
        "running_prefills": sum(router.queues.inflight(w.worker_id) for w in workers),
        "queue_waiters": len(router.queues._waiters),
        "session_locks": len(router.rounds.locks),
        "busy_sessions": sum(1 for s in router.sessions if s.busy),
        "decoding": sum(w.decoding for w in c.decode.values()),
        "pending_releases": len(router.retention),
    }


@pytest.fixture
def quiet():
    """Ten thousand injected faults would log ten thousand warnings (seconds of formatting)."""
    logger = logging.getLogger("ampd.router")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.parametrize("policy,n_decode,cfg", [
    ("ampd", 2, {"decode_kv_tokens": 3000}),  # small KV: migrations (and their releases) happen
    ("disagg", 2, {"balanced_pd_share": 0.5}),
])
def test_ten_thousand_rounds_with_failures_leave_nothing_behind(policy, n_decode, cfg, quiet):
    async def main():
        router, chaos = make_router(policy, n_decode, **cfg)
        outcomes = await drive(router, 10_000, random.Random(11))
        after_rounds = held(router)
        # What is left is only what named sessions legitimately keep: their residency, counted exactly.
        kv = {wid: w.kv_used_tokens for wid, w in router.cluster.decode.items()}
        ledger_kv = {wid: router.ledger.tokens_on(wid) for wid in router.cluster.decode}
        resident = {wid: sum(s.resident_tokens for s in router.sessions if s.resident_worker == wid)
                    for wid in router.cluster.decode}
        for s in router.sessions.expire(now=math.inf):  # every session idle past its TTL
            router.ledger.forget(s)
        final = {"ledger": len(router.ledger), "bindings": len(router.cluster.bindings),
                 "kv": sum(w.kv_used_tokens for w in router.cluster.decode.values()), "sessions": len(router.sessions)}
        return outcomes, after_rounds, kv, ledger_kv, resident, final, chaos, router.metrics

    outcomes, after_rounds, kv, ledger_kv, resident, final, chaos, metrics = asyncio.run(asyncio.wait_for(main(), 120))
    assert sum(outcomes.values()) == 10_000
    # every kind of ending happened (so the zeros below are not the zeros of an idle run)
    assert outcomes.get("200", 0) > 5000 and outcomes.get("cancelled", 0) > 300
    assert sum(v for k, v in outcomes.items() if k not in ("200", "cancelled")) > 300
    assert after_rounds == dict.fromkeys(after_rounds, 0)
    assert kv == ledger_kv == resident
    assert final == {"ledger": 0, "bindings": 0, "kv": 0, "sessions": 0}
    if policy == "ampd":
        rebinds = metrics.rebinds.labels("kv-pressure")._value.get()
        sent = metrics.retention_releases.labels("sent")._value.get()
        failed = metrics.retention_releases.labels("failed")._value.get()
        assert rebinds > 0 and sent > 0 and chaos.releases == sent + failed  # every release sent is accounted
