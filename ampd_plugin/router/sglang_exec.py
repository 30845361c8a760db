"""How the router runs one round against SGLang prefill/decode workers (`--engine sglang`).

SGLang's PD wire differs from vLLM's: there are no per-step `kv_transfer_params`. The router sends the
*same* body, carrying `bootstrap_host`/`bootstrap_port`/`bootstrap_room` (built by `sglang_wire`), to the
prefill worker and to the decode worker *concurrently*; the decode worker's receiver meets the prefill's
sender in that room, and the client gets the decode worker's answer. A local round (AMPD's addition) is
a decode-only request with the sentinel host, which the `ampd` SGLang plugin prefills in place.

Everything else — sessions, policy, queues, relay, accounting — is the router's shared code; this module
is one `RoundExecutor` (chosen once at start-up), written on `RoundIO`'s primitives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp
from starlette.responses import Response

from ampd_plugin.router import primitives as prim
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.round_io import RoundIO
from ampd_plugin.router.sglang_wire import SGLangPrefillEndpoint, bodies_for_route
from ampd_plugin.router.upstream import upstream_error
from ampd_plugin.router_policy.state import Route

log = logging.getLogger("ampd.router")


class PrefillRejected(Exception):
    """The prefill worker answered with an error status (the decode request is then aborted)."""

    def __init__(self, worker_id: str, status: int, data: bytes) -> None:
        super().__init__(f"{worker_id} answered {status}")
        self.worker_id, self.status, self.data = worker_id, status, data


class SGLangExecutor:
    """Runs a round's plan on SGLang workers: local = decode only; remote = P and D concurrently."""

    def __init__(self, io: RoundIO, bootstrap_ports: list[int], rng: random.Random | None = None) -> None:
        """`bootstrap_ports`: one per prefill worker, in the order of their ids."""
        self.io = io
        self.rng = rng
        prefill_ids = [wid for wid, ep in io.eps.items() if ep.kind == "prefill"]
        self.endpoints = {wid: SGLangPrefillEndpoint(io.eps[wid].url, port) for wid, port in zip(prefill_ids, bootstrap_ports)}
        self._background: set[asyncio.Task] = set()  # prefill requests still draining after the relay began

    async def execute(self, ctx: RoundCtx) -> Response:
        if ctx.plan.name == "remote":
            return await self._remote(ctx)
        if ctx.plan.name != "local":
            # Migration moves KV between decode workers through the vLLM connector; SGLang's wire has no such
            # request, so the new decode worker simply prefills the whole prompt itself.
            ctx.fallback = ctx.fallback or f"sglang-{ctx.plan.name}-as-local"
            ctx.plan = prim.local_plan(prim.RoundShape(ctx.decode, ctx.prompt_tokens, 0))
        return await self._local(ctx)

    async def _local(self, ctx: RoundCtx) -> Response:
        wire = bodies_for_route(Route("local", ctx.decode), ctx.body, self.endpoints, rng=self.rng)
        return await self.io.generate(ctx, ctx.plan.generate, wire.decode_body)

    async def _remote(self, ctx: RoundCtx) -> Response:
        io, step, prefill_wid = self.io, ctx.plan.generate, ctx.route.worker
        wire = bodies_for_route(ctx.route, ctx.body, self.endpoints, rng=self.rng)
        ctx.prefilled_on = prefill_wid  # TTFT belongs to P unless the round falls back to local below
        prefill = asyncio.create_task(self._prefill(ctx, prefill_wid, wire.prefill_body))
        decode = asyncio.create_task(io.post_generate(ctx, step, wire.decode_body))
        handed_over = False
        try:
            # Until the decode worker answers, a failed prefill means the decode is waiting for a transfer
            # that will never come: abort it and recover (retry elsewhere, or compute locally).
            while not decode.done() and not _failed(prefill):
                await asyncio.wait([t for t in (prefill, decode) if not t.done()], return_when=asyncio.FIRST_COMPLETED)
            if _failed(prefill):
                await _abort(decode)
                exc = prefill.exception()
                if isinstance(exc, PrefillRejected) and exc.status >= 500:
                    io.metrics.errors.labels("prefill_failed").inc()
                    log.warning("prefill on %s answered %s; the decode worker will compute the prompt",
                                prefill_wid, exc.status)
                    io.release(ctx)
                    ctx.fallback = "prefill-5xx"
                    ctx.prefilled_on = None
                    ctx.plan = prim.local_plan(prim.RoundShape(ctx.decode, ctx.prompt_tokens, ctx.task.l_hist))
                    return await self._local(ctx)
                if isinstance(exc, PrefillRejected):  # the engine refused the input itself: the client's error
                    raise upstream_error(exc.status, exc.data)
                raise exc  # WorkerDown / UpstreamTimeout: the round's retry loop handles them
            if _failed(decode):  # the decode worker is gone: the prefill's transfer has no reader
                await _abort(prefill)
                raise decode.exception()
            handed_over = True
            if not prefill.done():
                self._background.add(prefill)
                prefill.add_done_callback(self._prefill_finished_late)
            return await io.relay(ctx, step, decode)
        finally:
            if not handed_over:
                for t in (prefill, decode):
                    if not t.done():
                        await _abort(t)

    async def _prefill(self, ctx: RoundCtx, wid: str, body: dict) -> None:
        """POST the prefill body and read the answer to the end (its content is not the client's)."""
        status, data = await self.io.exchange(ctx, wid, ctx.generate_path, body, what="prefill response")
        ctx.prefill_done = time.monotonic()
        if status != 200:
            raise PrefillRejected(wid, status, data)
        self.io.release(ctx)  # the prefill worker is free for its next queued task
        self.io.remote_first_token(ctx)  # non-streaming: P's answer is the first visible sign of the prefill

    def _prefill_finished_late(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.io.metrics.errors.labels("prefill_failed").inc()
            log.warning("prefill failed after the decode worker answered: %s", task.exception())


def _failed(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def _abort(task: asyncio.Task) -> None:
    """Cancel a request task, or close its response if it already has one (the engine then aborts it)."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return
    if not task.cancelled() and task.exception() is None:
        resp = task.result()
        if isinstance(resp, aiohttp.ClientResponse):
            resp.close()
