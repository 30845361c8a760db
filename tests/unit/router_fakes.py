"""In-process fake engines and a harness for the router's unit tests.

`FakeEngine` is an aiohttp server speaking the OpenAI (vLLM-flavoured) format, streaming included. It
records every request it receives, answers prefill requests (`ampd` role "prefill") with a source
descriptor built by `connector.params`, and can be made slow, unhealthy, failing or dead. Its "model"
is deterministic: the answer depends on the whole prompt, so a wrong or truncated relay shows.
`RouterHarness` starts fakes plus a real uvicorn-served Router on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass, field

import aiohttp
import uvicorn
from aiohttp import web

from ampd_plugin.connector import params as wire
from ampd_plugin.localcluster import free_port
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router.server import Router
from ampd_plugin.router.sessions import PromptCounter

MODEL = "fake-model"




def prompt_ids(prompt_key: str) -> list[int]:
    """The fake tokenizer: a token-id prompt is itself, any other prompt hashes to eight ids."""
    with contextlib.suppress(ValueError):
        ids = json.loads(prompt_key)
        if isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids):
            return ids
    seed = hashlib.sha256(prompt_key.encode()).hexdigest()
    return [int(seed[i * 8:(i + 1) * 8], 16) % 997 for i in range(8)]


def answer_ids(prompt_key: str, n: int) -> list[int]:
    """The fake model's greedy answer, autoregressive: each token is a function of the eight before it, so
    continuing from prompt + the first k tokens gives exactly the rest (what a failover relies on)."""
    ids = prompt_ids(prompt_key)
    out: list[int] = []
    for _ in range(n):
        nxt = int(hashlib.sha256(",".join(map(str, (ids + out)[-8:])).encode()).hexdigest()[:8], 16) % 997
        out.append(nxt)
    return out


def answer_tokens(prompt_key: str, n: int) -> list[str]:
    return [f" w{i}" for i in answer_ids(prompt_key, n)]


def prompt_key(body: dict) -> str:
    if "messages" in body:
        return json.dumps(body["messages"], sort_keys=True)
    return json.dumps(body.get("prompt"))


@dataclass
class FakeEngine:
    name: str
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    tail_delay: float = 0.0  # between `data: [DONE]` and the end of the stream (a client may leave first)
    healthy: bool = True
    fail_status: int | None = None
    garbage_stream: bytes | None = None  # a streamed answer of these bytes (HTTP 200, no [DONE]) when set
    die_after_tokens: int | None = None  # SIGKILL-like death after streaming this many tokens
    stall_after_tokens: int | None = None  # goes silent (stays connected) after this many tokens
    hang_before_headers: bool = False  # accepts the request, never answers (a SIGSTOPped engine)
    prefill_stats: dict = field(default_factory=dict)  # extra connector stats in prefill responses
    metrics_page: str | None = None  # served on /metrics when set (else 404, as an engine without metrics)
    requests: list[dict] = field(default_factory=list)
    aborted: int = 0
    completed: int = 0
    active: int = 0
    inflight: int = 0
    max_inflight: int = 0
    port: int = 0
    _runner: web.AppRunner | None = None
    _transports: set = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> "FakeEngine":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # handler_cancellation: a client that hangs up cancels its handler, as vLLM aborts the request.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        self.port = port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def die(self) -> None:
        """SIGKILL-like: every open connection is reset at once, then the port closes."""
        for t in list(self._transports):
            t.abort()
        await self.stop()

    def kv_roles(self) -> list[str | None]:
        return [((r.get("kv_transfer_params") or {}).get("ampd") or {}).get("role") for r in self.requests]

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "root": "/nonexistent/fake", "max_model_len": 2048}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_page is None:
            return web.Response(status=404)
        return web.Response(text=self.metrics_page, content_type="text/plain")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        self._transports.add(request.transport)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._answer(request)
        finally:
            self.inflight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.hang_before_headers:
            await asyncio.sleep(3600)
        if self.fail_status:
            return web.json_response({"error": {"message": "injected failure", "type": "x", "code": self.fail_status}},
                                     status=self.fail_status)
        chat = request.path.endswith("chat/completions")
        ampd = (body.get("kv_transfer_params") or {}).get("ampd") or {}
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 8)
        key = prompt_key(body)
        ids = answer_ids(key, n)
        tokens = [f" w{i}" for i in ids]
        with_ids = bool(body.get("return_token_ids"))
        kv_out = None
        if ampd.get("role") == "prefill":
            source = wire.SourceDescriptor(engine=self.name, te="127.0.0.1:7000", notify="tcp://127.0.0.1:7001",
                                           xfer=ampd["xfer"], blocks=(0, 1), tokens=16, block_size=16,
                                           block_bytes=64, bases=(4096,))
            kv_out = wire.response_params(source=source, stats={"read_bytes": 128, **self.prefill_stats})
        if not body.get("stream"):
            await asyncio.sleep(self.first_token_delay + self.token_delay * n)
            self.completed += 1
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(tokens)}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": "".join(tokens), "finish_reason": "length"})
            return web.json_response({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                      "model": MODEL, "choices": [choice],
                                      "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
                                      "kv_transfer_params": kv_out})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.garbage_stream is not None:
            await resp.write(self.garbage_stream)
            await resp.write_eof()
            return resp
        self.active += 1
        try:
            def event(payload: dict) -> bytes:
                return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

            rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{len(self.requests)}"
            first = {"prompt_token_ids": prompt_ids(key)} if with_ids else {}
            if chat:
                await resp.write(event({"id": rid, "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], **first}))
                first = {}
            await asyncio.sleep(self.first_token_delay)
            for k, (tok, tid) in enumerate(zip(tokens, ids)):
                if self.die_after_tokens is not None and k == self.die_after_tokens:
                    await self.die()
                    return resp
                if self.stall_after_tokens is not None and k == self.stall_after_tokens:
                    await asyncio.sleep(3600)
                last = k == len(tokens) - 1
                choice = {"index": 0, **({"delta": {"content": tok}} if chat else {"text": tok}),
                          "finish_reason": "length" if last else None}
                if with_ids:
                    choice["token_ids"] = [tid]
                    if not chat:
                        choice.update(first)
                        first = {}
                await resp.write(event({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                        "created": 1, "model": MODEL, "choices": [choice]}))
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(event({"id": "x", "model": MODEL, "choices": [],
                                        "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}))
            await resp.write(b"data: [DONE]\n\n")
            if self.tail_delay:
                await asyncio.sleep(self.tail_delay)
            await resp.write_eof()
            self.completed += 1
        except (ConnectionResetError, asyncio.CancelledError, aiohttp.ClientConnectionResetError):
            self.aborted += 1
            raise
        finally:
            self.active -= 1
        return resp


class RouterHarness:
    """Fake P/D engines + a real Router served by uvicorn on loopback; use with `async with`."""

    def __init__(self, n_prefill: int = 1, n_decode: int = 1, policy: str = "ampd", policy_params: dict | None = None,
                 counter: PromptCounter | None = None, engines_of: "RouterHarness | None" = None, **cfg) -> None:
        self.counter = counter or PromptCounter(None)
        # engines_of: another harness whose (running) fakes this router fronts too, as a second replica
        self.owns_engines = engines_of is None
        self.prefill = engines_of.prefill if engines_of else [FakeEngine(f"P{i}") for i in range(n_prefill)]
        self.decode = engines_of.decode if engines_of else [FakeEngine(f"D{i}") for i in range(n_decode)]
        self.policy_name = policy
        self.policy_params = policy_params or {}
        self.cfg_overrides = cfg
        self.router: Router | None = None
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.client: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "RouterHarness":
        for e in self.prefill + self.decode if self.owns_engines else ():
            await e.start()
        from policy_fakes import FakeCost

        self.port = free_port()
        cfg = RouterConfig(prefill=[e.url for e in self.prefill], decode=[e.url for e in self.decode],
                           port=self.port, health_interval_s=0.2, health_timeout_s=0.5, decision_log=True)
        cfg = cfg.updated(self.cfg_overrides)
        cost = FakeCost()
        policy = load_policy(self.policy_name, cost, ttft_slo=cfg.ttft_slo, itl_slo=cfg.itl_slo, **self.policy_params)
        self.router = Router(cfg, policy, cost, counter=self.counter)
        config = uvicorn.Config(self.router.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on", loop="asyncio",
                                http=self.router.http_protocol())
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(200):
            if self._server.started:
                break
            await asyncio.sleep(0.02)
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self

    async def __aexit__(self, *exc) -> None:
        if self.client:
            await self.client.close()
        if self._server:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
        for e in self.prefill + self.decode if self.owns_engines else ():
            await e.stop()

    async def chat(self, messages: list[dict], session: str | None = None, stream: bool = False, max_tokens: int = 8,
                   headers: dict | None = None, **extra) -> tuple[int, dict | str, dict]:
        """(status, parsed JSON or concatenated streamed text, response headers)."""
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream, **extra}
        h = dict(headers or {})
        if session:
            h["X-Session-ID"] = session
        async with self.client.post(self.url + "/v1/chat/completions", json=body, headers=h) as r:
            if not stream or r.status != 200:
                return r.status, await r.json(content_type=None), dict(r.headers)
            text = []
            async for line in r.content:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    payload = json.loads(line[6:])
                    for c in payload.get("choices", []):
                        text.append(c.get("delta", {}).get("content") or "")
            return r.status, "".join(text), dict(r.headers)

    async def metrics_text(self) -> str:
        async with self.client.get(self.url + "/metrics") as r:
            return await r.text()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))
