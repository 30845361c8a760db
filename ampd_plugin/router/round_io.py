"""The engine-facing primitives a round executor is written in: send, exchange, generate, relay, release.

`RoundExecutor`s (`vllm_exec`, `sglang_exec`) express a round as a few calls on this object and never
reach into the router: queue slots are freed with `release`, every engine request goes through the one
upstream helper (`Upstreams`), and the decode worker's answer reaches the client through `relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Awaitable

import aiohttp
import orjson
from starlette.responses import Response

from ampd_plugin.connector import params as wire
from ampd_plugin.costmodel import CostModel
from ampd_plugin.router import primitives as prim
from ampd_plugin.router.accounting import RoundAccounting
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.failover import StreamFailover
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.queues import PrefillQueues
from ampd_plugin.router.relay import Relay, RelayResponse
from ampd_plugin.router.outliers import OutlierDetector
from ampd_plugin.router.upstream import Endpoint, UpstreamTimeout, Upstreams, WorkerDown, WorkerFailed
from ampd_plugin.router_policy.state import ClusterState

_JSON = "application/json"


class RoundIO:
    def __init__(self, eps: dict[str, Endpoint], upstreams: Upstreams, cluster: ClusterState, queues: PrefillQueues,
                 metrics: RouterMetrics, accounting: RoundAccounting, cost_model: CostModel,
                 outliers: OutlierDetector, stall_timeout_s: float, failover: StreamFailover | None = None) -> None:
        self.eps, self.upstreams, self.cluster, self.queues = eps, upstreams, cluster, queues
        self.metrics, self.accounting, self.cost_model = metrics, accounting, cost_model
        # Every engine answer is reported to the outlier detector; streams and prefills may be silent
        # for at most `stall_timeout_s` (a hung worker frees its slot and its client long before the
        # whole-request timeout).
        self.outliers = outliers
        self._stall_timeout = upstreams.with_read_timeout(stall_timeout_s)
        self.failover = failover  # continues a stream whose decode worker broke mid-round

    def continuable(self, ctx: RoundCtx, body: dict) -> None:
        """Make a streamed generate request one that can fail over mid-stream (vLLM workers)."""
        if self.failover is not None and ctx.stream:
            self.failover.prepare(ctx, body)

    def url(self, worker_id: str) -> str:
        return self.eps[worker_id].url

    def headers(self, ctx: RoundCtx) -> dict[str, str]:
        return {"Content-Type": _JSON, "X-Request-Id": ctx.request_id}

    def release(self, ctx: RoundCtx) -> None:
        """Free the round's prefill slot (once) so the policy's next queued task may start."""
        if not ctx.released and ctx.plan is not None and ctx.task is not None:
            ctx.released = True
            self.queues.release(ctx.plan.queue_worker, ctx.task)

    async def exchange(self, ctx: RoundCtx, worker_id: str, path: str, body: dict,
                       what: str = "response") -> tuple[int, bytes]:
        """A sub-request whose whole answer the router reads (a prefill): (status, body)."""
        try:
            status, data = await self.upstreams.exchange(worker_id, path, orjson.dumps(body), self.headers(ctx), what,
                                                         timeout=self._stall_timeout)
        except UpstreamTimeout:
            self.outliers.failure(worker_id, "timeout")
            raise
        if status >= 500:
            self.outliers.failure(worker_id, "5xx")
        else:
            self.outliers.success(worker_id)
        return status, data

    def post_generate(self, ctx: RoundCtx, step: prim.Step, body: dict) -> Awaitable[aiohttp.ClientResponse]:
        """POST the client-facing request to the decode worker (its answer is relayed with `relay`)."""
        timeout = self._stall_timeout if ctx.stream else None
        return self.upstreams.post(step.worker, ctx.generate_path, orjson.dumps(body), self.headers(ctx), timeout)

    async def generate(self, ctx: RoundCtx, step: prim.Step, body: dict) -> Response:
        """POST the client-facing request to the decode worker and relay its answer (any engine's wire)."""
        return await self.relay(ctx, step, self.post_generate(ctx, step, body))

    async def relay(self, ctx: RoundCtx, step: prim.Step, response: Awaitable[aiohttp.ClientResponse]) -> Response:
        """Wait for the decode worker's response headers, then relay its body and account for the round."""
        d = self.cluster.decode[step.worker]
        try:
            resp = await response
        except UpstreamTimeout:
            self.outliers.failure(step.worker, "timeout")
            raise
        headers = {"x-ampd-route": ctx.plan.name, "x-ampd-worker": ctx.route.worker if ctx.route else step.worker,
                   "x-ampd-decode": step.worker}
        if resp.status != 200:
            data = await resp.read()
            resp.release()
            self.release(ctx)
            self.metrics.errors.labels(f"upstream_{resp.status}").inc()
            if resp.status >= 500:  # the worker's fault, and nothing was sent yet: the round may run elsewhere
                self.outliers.failure(step.worker, "5xx")
                raise WorkerFailed(step.worker, resp.status, data)
            self.outliers.success(step.worker)
            return Response(data, status_code=resp.status, media_type=resp.content_type or _JSON, headers=headers)
        d.decoding += 1
        if ctx.stream:
            ctx.relay_started = True
            relay = Relay(ctx, resp, d, release=self.release, finish=self.accounting.finish, metrics=self.metrics,
                          first_token=self.accounting.first_token, outliers=self.outliers,
                          resume=self.failover.resume if self.failover is not None and ctx.tokens is not None else None)
            return RelayResponse(relay, headers=headers, media_type=resp.headers.get("content-type", "text/event-stream"))
        timer = None
        if not ctx.released and ctx.plan.queue_worker == step.worker:
            # Non-streaming: the first token is invisible, so free the prefill slot when the cost model
            # says the prefill is done (or at the response, whichever comes first).
            timer = asyncio.get_running_loop().call_later(self._predicted_prefill(ctx), self.release, ctx)
        try:
            data = await self.upstreams.read_body(step.worker, resp)
        except UpstreamTimeout:
            self.outliers.failure(step.worker, "timeout")
            raise
        finally:  # done, failed or cancelled (the client left): the round no longer decodes here
            d.decoding -= 1
            if timer is not None:
                timer.cancel()
        t_done = time.monotonic()
        self.outliers.success(step.worker)
        self.release(ctx)
        out, doc = 0, None
        with contextlib.suppress(Exception):
            doc = orjson.loads(data)
            out = int(doc["usage"]["completion_tokens"])
        if ctx.output is not None:
            ctx.output = _answer_text(doc)
        if isinstance(doc, dict) and step.recv is not None and step.recv.ref is not None:  # a migration's read
            with contextlib.suppress(Exception):
                self.history_report(ctx, step.recv.ref.holder, wire.response_stats(doc.get("kv_transfer_params")))
        self.accounting.finish(ctx, t_first=self.non_streaming_first_token(ctx, t_done), t_last=t_done, n_out=out, ok=True)
        return Response(data, media_type=_JSON, headers=headers)

    def history_report(self, ctx: RoundCtx, holder: str | None, stats: dict) -> None:
        """What a history read's holder really did (the connector's per-request stats): a recompute there
        means the session had been evicted from it."""
        n = stats.get("history_recomputed_tokens")
        if holder is not None and isinstance(n, int) and not isinstance(n, bool) and n > 0:
            self.accounting.history_recomputed(ctx, holder, n)

    def remote_first_token(self, ctx: RoundCtx) -> None:
        """Non-streaming round whose prefill a prefill worker did: TTFT is recorded at P's answer.

        Call once the generate step is built (so a fallback to local has already cleared `prefilled_on`).
        """
        if not ctx.stream and ctx.prefilled_on is not None and ctx.prefill_done is not None:
            self.accounting.first_token(ctx, ctx.prefill_done, "prefill")

    def non_streaming_first_token(self, ctx: RoundCtx, t_done: float) -> float:
        """When a non-streaming round's first token existed: P's answer when P prefilled (already recorded),
        else — the decode worker prefilled and its first token is invisible — the dispatch time plus the
        cost model's predicted prefill, capped at the response's arrival."""
        if ctx.ttft is not None:
            return ctx.t0 + ctx.ttft
        started = ctx.task.started_at if ctx.task and ctx.task.started_at is not None else ctx.t0
        ctx.ttft_source = "predicted"
        return min(t_done, started + self._predicted_prefill(ctx))

    def _predicted_prefill(self, ctx: RoundCtx) -> float:
        try:
            w = self.cluster.worker(ctx.plan.queue_worker)
            return max(0.0, float(self.cost_model.t_pre(ctx.task.l_hist, ctx.task.l_incr, w.layout)))
        except Exception:
            return 0.0


def _answer_text(doc) -> list[str] | None:
    """A non-streaming answer's generated text (None when it is not a plain single-choice answer)."""
    try:
        choice = doc["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
    except (KeyError, IndexError, TypeError):
        return None
    return [text] if isinstance(text, str) else None
