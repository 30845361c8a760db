"""How the router runs one round against vLLM workers: the plan's steps in order, each with its
`kv_transfer_params` (built by `primitives.Step.kv_params` from the connector's builders)."""

from __future__ import annotations

import logging
import time
from typing import Callable

import orjson
from starlette.responses import Response

from ampd_plugin.connector import params as wire
from ampd_plugin.router import primitives as prim
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.round_io import RoundIO
from ampd_plugin.router.upstream import UpstreamTimeout, upstream_error

log = logging.getLogger("ampd.router")

# Fields of the client's request that make no sense for a one-token prefill sub-request.
_NOT_FOR_PREFILL = ("stream_options", "min_tokens", "logprobs", "top_logprobs", "n", "best_of")


class VLLMExecutor:
    def __init__(self, io: RoundIO, kv_connector: str = "ampd", model: Callable[[], str | None] = lambda: None) -> None:
        self.io = io
        self.kv_connector = kv_connector
        self.model = model  # the served model name, for token-range prefills (the client's body has none)

    async def execute(self, ctx: RoundCtx) -> Response:
        io, plan = self.io, ctx.plan
        previous = None
        for step in plan.steps[:-1]:
            previous = await self.prefill(ctx, step)
        if plan.queue_worker != plan.generate.worker:
            io.release(ctx)
        body = self.generate_body(ctx, plan.generate, previous)
        io.remote_first_token(ctx)
        return await io.generate(ctx, plan.generate, body)

    async def prefill(self, ctx: RoundCtx, step: prim.Step) -> dict | None:
        """Run a prefill sub-request (max_tokens=1); returns its response kv_transfer_params.

        None when the prefill worker failed (5xx): the decode worker then computes the prompt itself.
        """
        io = self.io
        body = dict(ctx.body)
        for k in _NOT_FOR_PREFILL:
            body.pop(k, None)
        body.update(stream=False, max_tokens=1)
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        path = ctx.generate_path
        if step.end is not None and ctx.token_ids is not None:  # a token range: send token ids
            body = {"model": ctx.body.get("model") or self.model(), "prompt": ctx.token_ids[: step.end],
                    "max_tokens": 1, "stream": False, "temperature": 0}
            path = "/v1/completions"
        body["kv_transfer_params"] = step.kv_params(ctx.session_param, io.url, None, ctx.xfer_id)
        try:
            status, data = await io.exchange(ctx, step.worker, path, body, what="prefill response")
        except UpstreamTimeout:  # a stalled prefill worker: the decode worker computes the prompt instead
            io.metrics.errors.labels("prefill_stalled").inc()
            log.warning("prefill on %s stalled; the decode worker will compute the prompt", step.worker)
            ctx.fallback = "prefill-stalled"
            return None
        ctx.prefill_done = time.monotonic()
        if status >= 500:
            io.metrics.errors.labels("prefill_failed").inc()
            log.warning("prefill on %s answered %s; the decode worker will compute the prompt", step.worker, status)
            ctx.fallback = "prefill-5xx"
            ctx.prefilled_on = None
            return None
        if status != 200:  # the engine refused the input itself (e.g. too long): the client's error
            raise upstream_error(status, data)
        try:
            params = orjson.loads(data).get("kv_transfer_params")
        except (orjson.JSONDecodeError, AttributeError):
            params = None
        err = wire.response_error(params)
        ctx.prefilled_on = None if err else step.worker
        if err:
            io.metrics.errors.labels("kv_transfer").inc()
            log.warning("prefill on %s reported a transfer error: %s", step.worker, err)
        stats = wire.response_stats(params)
        if stats.get("read_bytes"):
            io.metrics.kv_bytes.labels("history_read").inc(int(stats["read_bytes"]))
        io.history_report(ctx, step.history.holder if step.history else None, stats)
        return params

    def generate_body(self, ctx: RoundCtx, step: prim.Step, previous: dict | None) -> dict:
        """The client's body plus the generate step's `kv_transfer_params` (none without the ampd connector)."""
        body = dict(ctx.body)
        try:
            kv = step.kv_params(ctx.session_param, self.io.url, previous, ctx.xfer_id)
        except wire.ParamsError as exc:  # no usable source from the prefill: compute everything on D
            log.warning("no KV source for %s (%s); decode worker computes the whole prompt", ctx.session.session_id, exc)
            ctx.fallback = ctx.fallback or "no-kv-source"
            ctx.prefilled_on = None  # the decode worker computes the whole prompt: its TTFT, not P's
            kv = wire.local_params(session=ctx.session_param)
        if self.kv_connector == "ampd":
            body["kv_transfer_params"] = kv
        self.io.continuable(ctx, body)
        return body
