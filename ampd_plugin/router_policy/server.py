"""The live router: an OpenAI-compatible front door that drives a routing policy against real engines.

Per round: identify the session, count the prompt (incrementally), bind the session to a decode worker
(policy.bind_session), pick a route (policy.route_prefill), turn it into sub-request steps
(`primitives`), wait for the chosen worker's prefill capacity in the router-held queue ordered by the
policy (`queues`), run the steps and relay the decode worker's answer, measuring TTFT and ITL from the
stream. Faults re-route instead of failing the session: a dead decode worker's sessions are rebound
and their next round is a full prefill elsewhere; a dead prefill worker's work goes elsewhere or local.

The relay path is aiohttp + uvloop + httptools, bytes relayed as they arrive; per chunk the router only
scans for SSE event boundaries (no JSON parsing), so its own cost stays well under a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import Receive, Scope, Send

from ampd_plugin import slo
from ampd_plugin.connector import params as wire
from ampd_plugin.router_policy import primitives as prim
from ampd_plugin.router_policy.config import RouterConfig
from ampd_plugin.router_policy.errors import RouterError, bad_request
from ampd_plugin.router_policy.metrics import RouterMetrics
from ampd_plugin.router_policy.queues import PrefillQueues
from ampd_plugin.router_policy.registry import PolicyError
from ampd_plugin.router_policy.sessions import PromptCounter, Session, SessionStore, session_identity
from ampd_plugin.costmodel import Layout
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route, SessionInfo, WorkerState
from ampd_plugin.router_policy.upstream import UpstreamTimeout, Upstreams, WorkerDown, endpoints

log = logging.getLogger("ampd.router")
decisions = logging.getLogger("ampd.router.decisions")

_JSON = "application/json"
_MAX_ATTEMPTS = 3  # a round survives up to two dead workers before the client sees an error
_request_ids = itertools.count()
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_INLINE_TOKENIZE_CHARS = 8192  # longer new text is tokenized in a thread so relays keep flowing


@dataclass
class RoundCtx:
    """Everything known about one round while it runs."""

    session: Session
    chat: bool
    body: dict
    stream: bool
    prompt: str | list[int]
    prompt_tokens: int
    t0: float
    request_id: str
    task: PrefillTask | None = None
    route: Route | None = None
    plan: prim.Plan | None = None
    decode: str = ""
    queue_wait: float = 0.0
    released: bool = False
    fallback: str = ""
    token_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Router:
    def __init__(self, cfg: RouterConfig, policy: Any, cost_model: Any, counter: PromptCounter | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.policy = policy
        self.cost_model = cost_model
        self.counter = counter
        self.metrics = RouterMetrics()
        self.eps = endpoints(cfg.prefill, cfg.decode)
        self.upstreams = Upstreams(
            self.eps,
            connect_timeout_s=cfg.connect_timeout_s,
            total_timeout_s=cfg.upstream_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            health_timeout_s=cfg.health_timeout_s,
        )
        self.cluster = ClusterState()
        window = float(getattr(policy, "window_s", 10.0))
        capacity = cfg.decode_kv_tokens or self._capacity()
        for ep in self.eps.values():
            w = WorkerState(ep.worker_id, ep.kind, Layout(), window_s=window)
            if ep.kind == "decode":
                w.kv_capacity_tokens = capacity
            self.cluster.add_worker(w)
            self.metrics.worker_up.labels(ep.worker_id, ep.kind).set(1)
        self.sessions = SessionStore(cfg.session_ttl_s)
        self.queues = PrefillQueues(self.cluster, self._order, self._slots, self._on_queue)
        self.model_card: dict | None = {"id": cfg.model, "object": "model"} if cfg.model else None
        self._bg: list[asyncio.Task] = []
        # One thread: HF fast tokenizers must not be called concurrently (their Rust object is borrowed).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ampd-tokenize")
        self._warned_no_kv = False
        # The round executor is chosen once: SGLang's PD wire (bootstrap fields, concurrent P and D
        # requests) only when its workers are disaggregated SGLang; everything else is the vLLM wire.
        if cfg.engine == "sglang" and cfg.kv_connector == "ampd":
            from ampd_plugin.router_policy.sglang_exec import SGLangExecutor

            self._execute = SGLangExecutor(self).execute
        else:
            self._execute = self._execute_vllm
        self.app = Starlette(
            routes=[
                HttpRoute("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                HttpRoute("/v1/completions", self.completions, methods=["POST"]),
                HttpRoute("/v1/models", self.models, methods=["GET"]),
                HttpRoute("/health", self.health, methods=["GET"]),
                HttpRoute("/metrics", self.metrics_endpoint, methods=["GET"]),
            ],
            lifespan=self._lifespan,
            exception_handlers={404: self._not_found, 405: self._not_allowed},
        )

    # ------------------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        await self.upstreams.start()
        self._apply_health(await self.upstreams.check_all())
        card = await self.upstreams.discover_model()
        if card:
            self.model_card = {**card, "id": self.cfg.model or card.get("id")}
        if self.counter is None:
            self.counter = PromptCounter.load(self.cfg.tokenizer or _local_dir((card or {}).get("root")))
        if self.cfg.max_prompt_tokens is None and card and isinstance(card.get("max_model_len"), int):
            self.cfg.max_prompt_tokens = card["max_model_len"]
        self._bg.append(asyncio.create_task(self.upstreams.health_loop(self.cfg.health_interval_s, self._health_tick)))
        # Everything loaded so far (tokenizer, libraries) lives for the whole run: keep it out of the
        # garbage collector's scans so a full collection never pauses the relay.
        gc.collect()
        gc.freeze()
        log.info("router ready: policy=%s connector=%s prefill=%s decode=%s model=%s",
                 getattr(self.policy, "name", self.policy), self.cfg.kv_connector,
                 [e.url for e in self.eps.values() if e.kind == "prefill"],
                 [e.url for e in self.eps.values() if e.kind == "decode"],
                 (self.model_card or {}).get("id"))

    async def stop(self) -> None:
        for t in self._bg:
            t.cancel()
        for t in self._bg:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._bg.clear()
        await self.upstreams.close()
        self._tokenize_pool.shutdown(wait=False)

    def _capacity(self) -> int:
        try:
            return int(self.cost_model.kv_capacity_tokens(Layout()))
        except Exception:
            return 0

    # ------------------------------------------------------------------------------ health
    def _health_tick(self, result: dict[str, bool]) -> None:
        self._apply_health(result)
        for s in self.sessions.expire():
            self._forget_session(s)
        self.metrics.sessions.set(len(self.sessions))

    def _apply_health(self, result: dict[str, bool]) -> None:
        for wid, ok in result.items():
            w = self.cluster.worker(wid)
            if ok and not w.alive:
                log.warning("worker %s (%s) is healthy again", wid, self.eps[wid].url)
                w.alive = True
                self.metrics.worker_up.labels(wid, w.kind).set(1)
            elif not ok and w.alive:
                self.mark_dead(wid, "health check failed")

    def mark_dead(self, wid: str, why: str) -> None:
        """Take a worker out of routing; its sessions lose their history and will be rebound."""
        w = self.cluster.worker(wid)
        if not w.alive:
            return
        log.warning("worker %s (%s) is down: %s", wid, self.eps[wid].url, why)
        w.alive = False
        self.metrics.worker_up.labels(wid, w.kind).set(0)
        self.metrics.errors.labels("worker_down").inc()
        if w.kind == "decode":
            lost = self.cluster.unbind_worker(wid)
            self.sessions.on_worker_lost(wid)
            w.kv_used_tokens = 0
            if lost:
                self.metrics.rebinds.labels("worker_down").inc(len(lost))
        self.queues.fail_all(wid, WorkerDown(wid, why))

    def _forget_session(self, s: Session) -> None:
        if s.resident_worker and s.resident_worker in self.cluster.decode:
            w = self.cluster.decode[s.resident_worker]
            w.kv_used_tokens = max(0, w.kv_used_tokens - s.resident_tokens)
        self.cluster.unbind_session(s.session_id)

    # ------------------------------------------------------------------------------ queues
    def _order(self, worker: WorkerState, now: float):
        try:
            return self.policy.order_queue(worker, now)
        except Exception as exc:  # a policy bug degrades to FIFO, never a stuck queue
            self.metrics.errors.labels("policy").inc()
            log.error("order_queue failed on %s: %s", worker.worker_id, exc)
            return None

    def _slots(self, wid: str) -> int:
        return self.cfg.prefill_slots if wid in self.cluster.prefill else self.cfg.local_prefill_slots

    def _on_queue(self, wid: str, qlen: int, reordered: bool) -> None:
        self.metrics.queue_len.labels(wid).set(qlen)
        if reordered:
            self.metrics.reorders.labels(wid).inc()

    # ------------------------------------------------------------------------------ endpoints
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except RouterError as e:
            return e.response()
        data = [self.model_card] if self.model_card and self.model_card.get("id") else []
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        workers = {wid: {"kind": ep.kind, "url": ep.url, "alive": self.cluster.worker(wid).alive,
                         "queue": len(self.cluster.worker(wid).queue)} for wid, ep in self.eps.items()}
        ok = bool(self.cluster.live_decode())
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": workers}, status_code=200 if ok else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return RouterError(404, f"no route {request.url.path}", "not_found").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return RouterError(405, f"method {request.method} not allowed on {request.url.path}", "method_not_allowed").response()

    # ------------------------------------------------------------------------------ request handling
    async def _serve(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        t0 = time.monotonic()
        try:
            self._auth(request)
            body = await self._read_json(request)
            self._validate(body, chat)
            response, disconnected = await _race_disconnect(request.receive, self._round(request, body, chat, t0))
            if disconnected:
                self.metrics.errors.labels("client_disconnect").inc()
                response = RouterError(499, "client closed the request", "client_disconnect").response()
        except RouterError as e:
            self.metrics.errors.labels(e.kind).inc()
            response = e.response()
        except Exception:  # never crash on input; the traceback goes to the log, not the client
            log.exception("internal error")
            self.metrics.errors.labels("internal").inc()
            response = RouterError(500, "internal router error", "internal").response()
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def _auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RouterError(401, "invalid or missing API key", "auth")

    async def _read_json(self, request: Request) -> dict:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RouterError(413, f"request body exceeds {limit} bytes", "oversize")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RouterError(413, f"request body exceeds {limit} bytes", "oversize")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise bad_request("empty request body; expected a JSON object", "invalid_json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object", "invalid_json")
        return body

    def _validate(self, body: dict, chat: bool) -> None:
        model = body.get("model")
        served = (self.model_card or {}).get("id")
        if model is not None and not isinstance(model, str):
            raise bad_request("'model' must be a string", "invalid_field", "model")
        if model and served and model != served:
            raise RouterError(404, f"The model `{model}` does not exist; this router serves `{served}`",
                              "model_not_found", "model")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise bad_request("'stream' must be true or false", "invalid_field", "stream")
        for name in ("max_tokens", "max_completion_tokens"):
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad_request(f"'{name}' must be a positive integer", "invalid_field", name)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise bad_request("'messages' must be a non-empty list", "empty_prompt", "messages")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise bad_request("each message must be an object with a 'role'", "invalid_field", "messages")
        else:
            p = body.get("prompt")
            ok = (isinstance(p, str) and p != "") or (
                isinstance(p, list) and p and (all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                                               or all(isinstance(t, str) and t for t in p)))
            if not ok:
                raise bad_request("'prompt' must be a non-empty string, list of strings or list of token ids",
                                  "empty_prompt", "prompt")

    async def _round(self, request: Request, body: dict, chat: bool, t0: float) -> Response:
        sid, explicit = session_identity(request.headers, body)
        body.pop("session_id", None)
        body.pop("kv_transfer_params", None)  # transfers are the router's business, never the client's
        session = self.sessions.get(sid, explicit)
        counter = self.counter or PromptCounter(None)
        prompt = counter.render(body, chat)
        extends = isinstance(prompt, str) and bool(session.last_text) and prompt.startswith(session.last_text)
        new_chars = len(prompt) - (len(session.last_text) if extends else 0) if isinstance(prompt, str) else 0
        if new_chars > _INLINE_TOKENIZE_CHARS:  # long text: tokenize off the event loop (Rust releases the GIL)
            n = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, counter.count, prompt, session)
        else:
            n = counter.count(prompt, session)
        if n <= 0:
            raise bad_request("the prompt is empty", "empty_prompt", "messages" if chat else "prompt")
        limit = self.cfg.max_prompt_tokens
        if limit and n >= limit:
            raise bad_request(f"the prompt has {n} tokens; this model's context is {limit}",
                              "context_length_exceeded", "messages" if chat else "prompt")
        if not extends and session.resident_tokens:
            session.resident_tokens = 0  # the client rewrote history: what the worker holds is not a prefix
        ctx = RoundCtx(session, chat, body, body.get("stream") is True, prompt, n, t0,
                       request.headers.get("x-request-id") or f"ampd-{next(_request_ids)}")
        session.busy = True
        try:
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    return await self._attempt(ctx)
                except WorkerDown as exc:
                    self.mark_dead(exc.worker_id, exc.detail)
                    self._release(ctx)
                    ctx.fallback = f"retry-after-{exc.worker_id}-down"
                    if attempt == _MAX_ATTEMPTS - 1 or not self.cluster.live_decode():
                        raise RouterError(503, "no live engine could serve the request", "no_worker") from None
                except UpstreamTimeout as exc:
                    self._release(ctx)
                    self._finish(ctx, ttft=None, t_first=None, t_last=None, n_out=0, ok=False)
                    raise RouterError(504, f"the engine ({exc.worker_id}) did not answer in time", "upstream_timeout") from None
            raise AssertionError("unreachable")
        finally:
            if not ctx.stream or ctx.extra.get("relay_started") is not True:
                session.busy = False

    # ------------------------------------------------------------------------------ one attempt
    async def _attempt(self, ctx: RoundCtx) -> Response:
        ctx.extra.pop("xfer", None)  # a retry is a new transfer
        ctx.extra.pop("prefill_done", None)
        now = time.monotonic()
        self.cluster.now = now
        s = ctx.session
        decode = self.cluster.bindings.get(s.session_id)
        if decode is None or not self.cluster.decode[decode].alive:
            decode = self._bind(s, ctx.prompt_tokens, "first-round" if s.rounds == 0 else "rebind")
        l_hist = min(s.resident_tokens, ctx.prompt_tokens - 1) if s.resident_worker == decode else 0
        task = PrefillTask(s.session_id, s.rounds, max(0, l_hist), ctx.prompt_tokens - max(0, l_hist), now, decode)
        ctx.task, ctx.decode, ctx.released = task, decode, False
        shape = prim.RoundShape(decode, ctx.prompt_tokens, task.l_hist)
        ctx.plan, ctx.route = self._plan(ctx, task, shape)
        await self.queues.acquire(ctx.plan.queue_worker, task)
        task.started_at = time.monotonic()
        ctx.queue_wait = task.started_at - now
        try:
            return await self._execute(ctx)
        except BaseException:
            self._release(ctx)
            raise

    async def _execute_vllm(self, ctx: RoundCtx) -> Response:
        """vLLM wire: run the plan's steps in order, each carrying its `kv_transfer_params`."""
        previous = None
        for step in ctx.plan.steps[:-1]:
            previous = await self._prefill_step(ctx, step)
        if ctx.plan.queue_worker != ctx.plan.generate.worker:
            self._release(ctx)
        return await self._generate(ctx, ctx.plan.generate, previous)

    def _bind(self, s: Session, prompt_tokens: int, reason: str) -> str:
        try:
            wid = self.policy.bind_session(SessionInfo(s.session_id, first_prompt_tokens=prompt_tokens), self.cluster)
        except PolicyError as exc:
            live = self.cluster.live_decode()
            if not live:
                raise RouterError(503, "no live decode worker", "no_worker") from None
            log.error("bind_session failed (%s); binding to %s", exc, live[0].worker_id)
            wid = live[0].worker_id
            self.cluster.bindings[s.session_id] = wid
        if reason == "rebind":
            self.metrics.rebinds.labels("lost-worker").inc()
        return wid

    def _plan(self, ctx: RoundCtx, task: PrefillTask, shape: prim.RoundShape) -> tuple[prim.Plan, Route]:
        """The policy's route, turned into steps (plus the two strategies: migration, balanced PD)."""
        d = self.cluster.decode[shape.decode]
        if self.cfg.kv_connector == "none":
            return prim.local_plan(shape), Route("local", shape.decode, "no-kv-connector")
        migrated = self._maybe_migrate(ctx, task, shape, d)
        if migrated is not None:
            return migrated
        try:
            route = self.policy.route_prefill(task, self.cluster)
        except PolicyError as exc:
            self.metrics.errors.labels("policy").inc()
            log.error("route_prefill failed: %s; running the prefill locally", exc)
            route = Route("local", shape.decode, "policy-error")
        if route.kind == "local":
            return prim.local_plan(shape), route
        share = self.cfg.balanced_pd_share
        if share > 0:
            ctx.token_ids = (self.counter or PromptCounter(None)).token_ids(ctx.prompt)
            if ctx.token_ids is not None and len(ctx.token_ids) == ctx.prompt_tokens:
                return prim.balanced_pd_plan(shape, route.worker, share), route
        return prim.remote_plan(shape, route.worker), route

    def _maybe_migrate(self, ctx, task, shape, d: WorkerState):
        """Context migration: the bound worker is short of KV memory for this round → move the session."""
        if not (self.cfg.migrate_on_kv_pressure and task.l_hist > 0 and d.kv_capacity_tokens > 0):
            return None
        need = task.l_incr + int(ctx.body.get("max_tokens") or ctx.body.get("max_completion_tokens") or 256)
        if d.kv_free_tokens >= need:
            return None
        others = [w for w in self.cluster.live_decode() if w.worker_id != d.worker_id and w.kv_free_tokens >= need + task.l_hist]
        if not others:
            return None
        new = max(others, key=lambda w: w.kv_free_tokens).worker_id
        self.cluster.bindings[ctx.session.session_id] = new
        self.metrics.rebinds.labels("kv-pressure").inc()
        task.decode_worker = ctx.decode = new
        plan = prim.migration_plan(prim.RoundShape(new, shape.prompt_tokens, shape.l_hist), d.worker_id)
        return plan, Route("local", new, f"migrate-from-{d.worker_id}")

    def _predicted_prefill(self, ctx: RoundCtx) -> float:
        try:
            w = self.cluster.worker(ctx.plan.queue_worker)
            return max(0.0, float(self.cost_model.t_pre(ctx.task.l_hist, ctx.task.l_incr, w.layout)))
        except Exception:
            return 0.0

    def _release(self, ctx: RoundCtx) -> None:
        if not ctx.released and ctx.plan is not None and ctx.task is not None:
            ctx.released = True
            self.queues.release(ctx.plan.queue_worker, ctx.task)

    # ------------------------------------------------------------------------------ steps
    def _url(self, wid: str) -> str:
        return self.eps[wid].url

    def _xfer(self, ctx: RoundCtx) -> str:
        if "xfer" not in ctx.extra:
            ctx.extra["xfer"] = wire.new_xfer_id()
        return ctx.extra["xfer"]

    def _session_param(self, ctx: RoundCtx) -> str | None:
        return ctx.session.session_id if ctx.session.explicit else None

    async def _prefill_step(self, ctx: RoundCtx, step: prim.Step) -> dict | None:
        """Run a prefill sub-request (max_tokens=1); returns its response kv_transfer_params."""
        body = dict(ctx.body)
        for k in ("stream_options", "min_tokens", "logprobs", "top_logprobs", "n", "best_of"):
            body.pop(k, None)
        body.update(stream=False, max_tokens=1)
        if "max_completion_tokens" in body:
            body["max_completion_tokens"] = 1
        path = "/v1/chat/completions" if ctx.chat else "/v1/completions"
        if step.end is not None and ctx.token_ids is not None:  # a token range: send token ids
            body = {"model": ctx.body.get("model") or (self.model_card or {}).get("id"), "prompt": ctx.token_ids[: step.end],
                    "max_tokens": 1, "stream": False, "temperature": 0}
            path = "/v1/completions"
        body["kv_transfer_params"] = step.kv_params(self._session_param(ctx), self._url, None, lambda: self._xfer(ctx))
        resp = await self.upstreams.post(step.worker, path, orjson.dumps(body), self.headers(ctx))
        try:
            data = await resp.read()
        except asyncio.TimeoutError as exc:
            resp.close()
            raise UpstreamTimeout(step.worker) from exc
        except aiohttp.ClientError as exc:
            resp.close()
            raise WorkerDown(step.worker, f"prefill response broken: {exc}") from exc
        ctx.extra["prefill_done"] = time.monotonic()
        if resp.status >= 500:
            self.metrics.errors.labels("prefill_failed").inc()
            log.warning("prefill on %s answered %s; the decode worker will compute the prompt", step.worker, resp.status)
            ctx.fallback = "prefill-5xx"
            return None
        if resp.status != 200:  # the engine refused the input itself (e.g. too long): the client's error
            raise _upstream_error(resp.status, data)
        try:
            params = orjson.loads(data).get("kv_transfer_params")
        except (orjson.JSONDecodeError, AttributeError):
            params = None
        err = wire.response_error(params)
        if err:
            self.metrics.errors.labels("kv_transfer").inc()
            log.warning("prefill on %s reported a transfer error: %s", step.worker, err)
        stats = wire.response_stats(params)
        if stats.get("read_bytes"):
            self.metrics.kv_bytes.labels("history_read").inc(int(stats["read_bytes"]))
        return params

    def headers(self, ctx: RoundCtx) -> dict[str, str]:
        return {"Content-Type": _JSON, "X-Request-Id": ctx.request_id}

    async def _generate(self, ctx: RoundCtx, step: prim.Step, previous: dict | None) -> Response:
        body = dict(ctx.body)
        try:
            kv = step.kv_params(self._session_param(ctx), self._url, previous, lambda: self._xfer(ctx))
        except wire.ParamsError as exc:  # no usable source from the prefill: compute everything on D
            log.warning("no KV source for %s (%s); decode worker computes the whole prompt", ctx.session.session_id, exc)
            ctx.fallback = ctx.fallback or "no-kv-source"
            kv = wire.local_params(session=self._session_param(ctx))
        if self.cfg.kv_connector == "ampd":
            body["kv_transfer_params"] = kv
        return await self.send_generate(ctx, step, body)

    async def send_generate(self, ctx: RoundCtx, step: prim.Step, body: dict) -> Response:
        """POST the client-facing request to the decode worker and relay its answer (any engine's wire)."""
        return await self.relay_generate(ctx, step, self.post_generate(ctx, step, body))

    def post_generate(self, ctx: RoundCtx, step: prim.Step, body: dict) -> Awaitable[aiohttp.ClientResponse]:
        path = "/v1/chat/completions" if ctx.chat else "/v1/completions"
        return self.upstreams.post(step.worker, path, orjson.dumps(body), self.headers(ctx))

    async def relay_generate(self, ctx: RoundCtx, step: prim.Step, response: Awaitable[aiohttp.ClientResponse]) -> Response:
        """Wait for the decode worker's response headers, then relay its body and account for the round."""
        d = self.cluster.decode[step.worker]
        resp = await response
        headers = {"x-ampd-route": ctx.plan.name, "x-ampd-worker": ctx.route.worker if ctx.route else step.worker,
                   "x-ampd-decode": step.worker}
        if resp.status != 200:
            data = await resp.read()
            resp.release()
            self._release(ctx)
            self.metrics.errors.labels(f"upstream_{resp.status}").inc()
            return Response(data, status_code=resp.status, media_type=resp.content_type or _JSON, headers=headers)
        d.decoding += 1
        if ctx.stream:
            ctx.extra["relay_started"] = True
            return RelayResponse(self._relay(ctx, resp, d), headers=headers,
                                 media_type=resp.headers.get("content-type", "text/event-stream"))
        timer = None
        if not ctx.released and ctx.plan.queue_worker == step.worker:
            # Non-streaming: the first token is invisible, so free the prefill slot when the cost model
            # says the prefill is done (or at the response, whichever comes first).
            timer = asyncio.get_running_loop().call_later(self._predicted_prefill(ctx), self._release, ctx)
        try:
            data = await resp.read()
        except asyncio.TimeoutError as exc:
            resp.close()
            d.decoding -= 1
            raise UpstreamTimeout(step.worker) from exc
        except aiohttp.ClientError as exc:
            resp.close()
            d.decoding -= 1
            raise WorkerDown(step.worker, f"response broken: {exc}") from exc
        finally:
            if timer is not None:
                timer.cancel()
        t_done = time.monotonic()
        d.decoding -= 1
        self._release(ctx)
        out = 0
        with contextlib.suppress(Exception):
            out = int(orjson.loads(data)["usage"]["completion_tokens"])
        self._finish(ctx, ttft=None, t_first=None, t_last=t_done, n_out=out, ok=True)
        return Response(data, media_type=_JSON, headers=headers)

    def _relay(self, ctx: RoundCtx, resp: aiohttp.ClientResponse, d: WorkerState) -> "_Relay":
        return _Relay(self, ctx, resp, d)

    # ------------------------------------------------------------------------------ accounting
    def _finish(self, ctx: RoundCtx, *, ttft: float | None, t_first: float | None, t_last: float | None,
                n_out: int, ok: bool) -> None:
        now = time.monotonic()
        s, route, plan = ctx.session, ctx.route, ctx.plan
        d = self.cluster.decode[ctx.decode]
        tpot = slo.tpot(t_first, t_last, n_out) if (t_first is not None and t_last is not None) else None
        prefiller = route.worker if route and route.kind == "remote" else ctx.decode
        if ttft is None and route and route.kind == "remote" and "prefill_done" in ctx.extra:
            ttft = ctx.extra["prefill_done"] - ctx.t0  # non-streaming: the prefill's completion stands in
        if ok and ttft is not None:
            self.cluster.record_ttft(prefiller, now, ttft)
            self.policy.on_metrics(prefiller, "ttft", ttft, now)
            self.metrics.ttft.labels(prefiller, route.kind if route else "local").observe(ttft)
        if ok and tpot is not None:
            self.cluster.record_itl(ctx.decode, now, tpot)
            self.policy.on_metrics(ctx.decode, "itl", tpot, now)
            self.metrics.itl.labels(ctx.decode).observe(tpot)
        if ok and n_out:
            self.policy.on_metrics(ctx.decode, "output_tokens", float(n_out), now)
        # what the decode worker now holds for this session
        if s.resident_worker and s.resident_worker in self.cluster.decode:
            old = self.cluster.decode[s.resident_worker]
            old.kv_used_tokens = max(0, old.kv_used_tokens - s.resident_tokens)
        if ok and s.explicit:
            s.resident_tokens, s.resident_worker = ctx.prompt_tokens + n_out, ctx.decode
            d.kv_used_tokens += s.resident_tokens
        else:
            s.resident_tokens, s.resident_worker = 0, None
        s.rounds += 1
        if not s.explicit:
            self.cluster.unbind_session(s.session_id)
        kv_bytes = plan.kv_tokens_moved * int(getattr(self.cost_model, "kv_bytes_per_token", 0) or 0) if plan else 0
        if kv_bytes and ok:
            self.metrics.kv_bytes.labels(plan.name).inc(kv_bytes)
        self.metrics.rounds.labels("true" if ctx.task and ctx.task.round_index == 0 else "false").inc()
        if route:
            self.metrics.routes.labels(route.kind, route.worker, route.reason or plan.name).inc()
        if not ok:
            self.metrics.errors.labels("round_failed").inc()
        if self.cfg.decision_log:
            decisions.info(orjson.dumps({
                "event": "round", "session": s.session_id, "round": ctx.task.round_index if ctx.task else None,
                "plan": plan.name if plan else None, "route": route.kind if route else None,
                "worker": route.worker if route else None, "decode": ctx.decode,
                "reason": route.reason if route else None, "fallback": ctx.fallback or None,
                "l_hist": ctx.task.l_hist if ctx.task else None, "l_incr": ctx.task.l_incr if ctx.task else None,
                "queue_wait_ms": round(ctx.queue_wait * 1e3, 3),
                "ttft_ms": round(ttft * 1e3, 3) if ttft is not None else None,
                "tpot_ms": round(tpot * 1e3, 3) if tpot is not None else None,
                "out_tokens": n_out, "ok": ok,
            }).decode())


# ---------------------------------------------------------------------------------------------- helpers
class _Relay:
    """Relays one upstream SSE stream; times the first token and the gaps from event boundaries.

    Per chunk it only looks for event boundaries (no JSON parsing). `close()` is idempotent and runs
    the round's accounting exactly once, whether the stream ended, broke, or the client left.
    """

    def __init__(self, router: Router, ctx: RoundCtx, resp: aiohttp.ClientResponse, d: WorkerState) -> None:
        self.router, self.ctx, self.resp, self.d = router, ctx, resp, d
        self.n_out = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.ok = False
        self.closed = False
        self.usage_tokens: int | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buf = b""
        try:
            async for chunk in self.resp.content.iter_any():
                buf += chunk
                if b"\n\n" in buf:
                    now = time.monotonic()
                    events = buf.split(b"\n\n")
                    buf = events.pop()
                    for ev in events:
                        if b'"completion_tokens":' in ev:  # a usage chunk (client asked include_usage): exact count
                            m = _COMPLETION_TOKENS.search(ev)
                            if m:
                                self.usage_tokens = int(m.group(1))
                        if _is_token_event(ev):
                            self.n_out += 1
                            self.t_last = now
                            if self.t_first is None:
                                self.t_first = now
                                self.router._release(self.ctx)  # the prefill is over: next task may start
                yield chunk
            self.ok = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.router.metrics.errors.labels("stream_broken").inc()
            log.warning("stream from %s broke: %s", self.d.worker_id, exc)
            yield (b'data: {"error": {"message": "upstream stream broke", "type": "upstream_error", '
                   b'"code": "stream_broken"}}\n\n')

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ok:
            self.resp.release()
        else:
            self.resp.close()  # dropping the connection makes the engine abort the request
        self.d.decoding -= 1
        ctx = self.ctx
        self.router._release(ctx)
        ctx.session.busy = False
        ttft = (self.t_first - ctx.t0) if self.t_first is not None else None
        # Token events undercount slightly (a token that decodes to "" sends an empty delta); the usage
        # chunk, when present, is exact.
        n_out = self.usage_tokens if self.usage_tokens is not None else self.n_out
        self.router._finish(ctx, ttft=ttft, t_first=self.t_first, t_last=self.t_last, n_out=n_out, ok=self.ok)


class RelayResponse(Response):
    """A streaming response that notices a client disconnect and then stops (closing the upstream).

    uvicorn silently drops writes after a disconnect, so a plain StreamingResponse would keep reading
    the engine's stream to the end; here the body is raced against `http.disconnect`.
    """

    def __init__(self, relay: _Relay, headers: dict[str, str], media_type: str) -> None:
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
            await _race_disconnect(receive, pump())
        finally:
            self.relay.close()


async def _race_disconnect(receive: Receive, work: Awaitable) -> tuple[Any, bool]:
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


def _is_token_event(ev: bytes) -> bool:
    """A `data:` event carrying generated text (not the role header, usage-only chunk or [DONE])."""
    i = ev.find(b'"content":"')
    if i >= 0 and ev[i + 11 : i + 12] != b'"':
        return True
    i = ev.find(b'"text":"')
    return i >= 0 and ev[i + 8 : i + 9] != b'"'


def _upstream_error(status: int, data: bytes) -> RouterError:
    message = "upstream refused the request"
    with contextlib.suppress(Exception):
        err = orjson.loads(data).get("error")
        message = err.get("message", message) if isinstance(err, dict) else str(err or message)
    return RouterError(status if 400 <= status < 500 else 502, message, f"upstream_{status}")


def _local_dir(path: Any) -> str | None:
    import os

    return path if isinstance(path, str) and os.path.isdir(path) else None


def build_app(cfg: RouterConfig, policy: Any, cost_model: Any, counter: PromptCounter | None = None) -> Router:
    return Router(cfg, policy, cost_model, counter)
