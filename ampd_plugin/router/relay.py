"""Relaying a decode worker's stream to the client: token timing, and the client's disconnect.

The relay path is aiohttp + uvloop + httptools, bytes relayed as they arrive; per chunk the router only
scans for SSE event boundaries (no JSON parsing), so its own cost stays well under a millisecond.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.outliers import OutlierDetector
from ampd_plugin.router_policy.state import WorkerState

log = logging.getLogger("ampd.router")

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_DRAIN_S = 5.0  # after the client left at [DONE], how long the router waits for the engine's end of stream
_drains: set[asyncio.Task] = set()  # background drains (kept referenced until they end)

# finish(ctx, t_first=, t_last=, n_out=, ok=): the round's accounting (`RoundAccounting.finish`).
Finish = Callable[..., None]
# first_token(ctx, t, source): TTFT recorded the moment the first token arrives (`RoundAccounting.first_token`).
FirstToken = Callable[[RoundCtx, float, str], None]
# resume(ctx, failed worker, cause) -> a continuation of the broken stream, or None (`StreamFailover.resume`).
Resume = Callable[[RoundCtx, str, str], Awaitable[Any]]


class Relay:
    """Relays one upstream SSE stream; times the first token and the gaps from event boundaries.

    Per chunk it only looks for event boundaries (no JSON parsing). `close()` is idempotent and runs
    the round's accounting exactly once, whether the stream ended, broke, or the client left.
    A stream whose `data: [DONE]` event was relayed is a completed round even if the client then closes
    before the engine's end of stream (the OpenAI SDK does): the router drains the rest itself.
    """

    def __init__(self, ctx: RoundCtx, resp: aiohttp.ClientResponse, d: WorkerState, *,
                 release: Callable[[RoundCtx], None], finish: Finish, metrics: RouterMetrics,
                 first_token: FirstToken | None = None, outliers: OutlierDetector | None = None,
                 resume: Resume | None = None) -> None:
        self.ctx, self.resp, self.d = ctx, resp, d
        self._release, self._finish, self._metrics, self._outliers = release, finish, metrics, outliers
        self._first_token = first_token
        self._resume = resume  # continues a broken stream on another worker (router/failover.py)
        self.saw_done = False  # the engine's `[DONE]` event went through: the answer is complete
        self.n_out = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.ok = False
        self.closed = False
        self.usage_tokens: int | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # Events are rewritten only when the router asked the engine for token ids (failover); otherwise
        # the engine's bytes go out exactly as they came.
        rewrite: Callable[[bytes], bytes | None] | None = self.ctx.tokens.observe if self.ctx.tokens else None
        while True:
            try:
                async for out in self._events(rewrite):
                    yield out
                break
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                stalled = isinstance(exc, asyncio.TimeoutError)
                kind = "stream_stalled" if stalled else "stream_broken"
                self._metrics.errors.labels(kind).inc()
                if self._outliers is not None:
                    self._outliers.failure(self.d.worker_id, "stall" if stalled else "broken")
                log.warning("stream from %s %s: %r", self.d.worker_id, "stalled" if stalled else "broke", exc)
                cont = await self._resume(self.ctx, self.d.worker_id, kind) if self._resume is not None else None
                if cont is None:
                    yield (b'data: {"error": {"message": "upstream stream broke", "type": "upstream_error", '
                           b'"code": "stream_broken"}}\n\n')
                    return
                self.resp.close()  # the engine, if alive, aborts the request
                self.d.decoding -= 1
                self.resp, self.d, rewrite = cont.resp, cont.worker, cont.convert
                self.d.decoding += 1
        if not self.saw_done:
            # The engine ended a 200 stream without `[DONE]`: garbage, or an answer cut short. The client
            # must learn it is incomplete, and the worker counts as failing.
            self._metrics.errors.labels("stream_incomplete").inc()
            if self._outliers is not None:
                self._outliers.failure(self.d.worker_id, "broken")
            log.warning("stream from %s ended without [DONE] after %d token events", self.d.worker_id, self.n_out)
            yield (b'\n\ndata: {"error": {"message": "the decode worker ended its stream without [DONE]; the '
                   b'answer is incomplete", "type": "upstream_error", "code": "stream_incomplete"}}\n\n')
            return
        self.ok = True
        if self._outliers is not None:
            self._outliers.success(self.d.worker_id)

    async def _events(self, rewrite: Callable[[bytes], bytes | None] | None) -> AsyncIterator[bytes]:
        """The current upstream's body, passed through (or rewritten event by event), with token timing."""
        buf = b""
        async for chunk in self.resp.content.iter_any():
            buf += chunk
            if b"\n\n" not in buf:
                if rewrite is None:
                    yield chunk
                continue
            now = time.monotonic()
            events = buf.split(b"\n\n")
            buf = events.pop()
            kept: list[bytes] | None = [] if rewrite is not None else None
            for ev in events:
                if rewrite is not None:
                    ev = rewrite(ev)
                    if ev is None:
                        continue
                    kept.append(ev)
                if ev.startswith(b"data: [DONE]"):
                    self.saw_done = True
                    continue
                if b'"completion_tokens":' in ev:  # a usage chunk (client asked include_usage): exact count
                    m = _COMPLETION_TOKENS.search(ev)
                    if m:
                        self.usage_tokens = int(m.group(1))
                if is_token_event(ev):
                    if self.ctx.output is not None:
                        collect_text(self.ctx, ev)
                    self.n_out += 1
                    self.t_last = now
                    if self.t_first is None:
                        self.t_first = now
                        self._release(self.ctx)  # the prefill is over: next task may start
                        if self._first_token is not None:
                            self._first_token(self.ctx, now, "stream")
            if kept is None:
                yield chunk
            elif kept:
                yield b"\n\n".join(kept) + b"\n\n"
        if buf and rewrite is not None:
            yield buf  # a trailing partial event, as the engine sent it

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ok:
            self.resp.release()
        elif self.saw_done:  # the client left after [DONE]: the answer is whole, read the engine's end
            task = asyncio.ensure_future(_drain(self.resp))
            _drains.add(task)
            task.add_done_callback(_drains.discard)
        else:
            self.resp.close()  # dropping the connection makes the engine abort the request
        self.d.decoding -= 1
        ctx = self.ctx
        self._release(ctx)
        ctx.finish_session_round()
        # Token events undercount slightly (a token that decodes to "" sends an empty delta); the usage
        # chunk, when present, is exact.
        n_out = self.usage_tokens if self.usage_tokens is not None else self.n_out
        self._finish(ctx, t_first=self.t_first, t_last=self.t_last, n_out=n_out, ok=self.ok or self.saw_done)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read what the engine still sends after [DONE] (normally nothing), then give the connection back."""
    try:
        await asyncio.wait_for(resp.read(), _DRAIN_S)
        resp.release()
    except Exception:  # noqa: BLE001 - an engine that does not end its stream is simply disconnected
        resp.close()


class RelayResponse(Response):
    """A streaming response that notices a client disconnect and then stops (closing the upstream).

    uvicorn silently drops writes after a disconnect, so a plain StreamingResponse would keep reading
    the engine's stream to the end; here the body is raced against `http.disconnect`.
    """

    def __init__(self, relay: Relay, headers: dict[str, str], media_type: str) -> None:
        self.relay = relay
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.relay:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await race_disconnect(receive, pump())
        finally:
            self.relay.close()


async def race_disconnect(receive: Receive, work: Awaitable) -> tuple[Any, bool]:
    """Run `work` until done or until the client disconnects (then cancel it); returns (result, disconnected).

    The work runs in the calling task; one watcher task cancels it on `http.disconnect`.
    """
    current = asyncio.current_task()
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                disconnected = True
                current.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work, False
    except asyncio.CancelledError:
        if not disconnected:
            raise
        if hasattr(current, "uncancel"):  # Python ≥ 3.11
            current.uncancel()
        return None, True
    finally:
        watcher.cancel()


def collect_text(ctx: RoundCtx, ev: bytes) -> None:
    """Keep a named session's generated text (the next round's prompt is compared with it); bounded."""
    from ampd_plugin.router.history import MAX_OUTPUT_CHARS

    try:
        choice = orjson.loads(ev[ev.index(b"{"):])["choices"][0]
        text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = None
    out = ctx.output
    if not isinstance(text, str) or out is None or sum(map(len, out)) + len(text) > MAX_OUTPUT_CHARS:
        ctx.output = None  # not known exactly: the next round is not limited by it
        return
    out.append(text)


def is_token_event(ev: bytes) -> bool:
    """A `data:` event carrying generated text (not the role header, usage-only chunk or [DONE])."""
    i = ev.find(b'"content":"')
    if i >= 0 and ev[i + 11 : i + 12] != b'"':
        return True
    i = ev.find(b'"text":"')
    return i >= 0 and ev[i + 8 : i + 9] != b'"'
