"""The live router: an OpenAI-compatible front door that drives a routing policy against real engines.

`Router` only assembles the pieces and serves HTTP: `intake` checks what a client sends, `rounds` runs a
round (session, count, bind, plan, queue, retry), an `executor` turns the plan into engine requests on
`round_io`'s primitives, `relay` streams the answer back, `accounting` records what the round measured,
`health` keeps the workers' liveness, and `ledger` tracks which worker holds which session's KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from ampd_plugin.costmodel import CostModel, Layout
from ampd_plugin.router import intake
from ampd_plugin.router.accounting import RoundAccounting
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.engine_metrics import EngineSignals
from ampd_plugin.router.errors import RouterError
from ampd_plugin.router.executor import make_executor
from ampd_plugin.router.health import WorkerHealth
from ampd_plugin.router.limits import guarded_protocol
from ampd_plugin.router.history import MAX_OUTPUT_CHARS
from ampd_plugin.router.ledger import CONNECTOR_DEFAULT_RETENTION_S, KVLedger
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.failover import StreamFailover
from ampd_plugin.router.outliers import OutlierDetector
from ampd_plugin.router.planning import RoundPlanner
from ampd_plugin.router.recalibration import OnlineRefit
from ampd_plugin.router.queues import PrefillQueues
from ampd_plugin.router.relay import race_disconnect
from ampd_plugin.router.replication import Replication, make_store
from ampd_plugin.router.retention import RetentionReleaser
from ampd_plugin.router.round_io import RoundIO
from ampd_plugin.router.rounds import RoundRunner
from ampd_plugin.router.sessions import PromptCounter, SessionStore
from ampd_plugin.router.upstream import Upstreams, endpoints
from ampd_plugin.router_policy.registry import PolicyRunner
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, WorkerState

log = logging.getLogger("ampd.router")


class Router:
    def __init__(self, cfg: RouterConfig, policy: PolicyRunner, cost_model: CostModel,
                 counter: PromptCounter | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.policy = policy
        self.cost_model = cost_model
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
        capacity = cfg.decode_kv_tokens or self._capacity()
        for ep in self.eps.values():
            w = WorkerState(ep.worker_id, ep.kind, Layout(backend=cfg.engine), window_s=policy.window_s)
            if ep.kind == "decode":
                w.kv_capacity_tokens = capacity
            self.cluster.add_worker(w)
            self.metrics.worker_up.labels(ep.worker_id, ep.kind).set(1)
        self.sessions = SessionStore(cfg.session_ttl_s, cfg.max_sessions, cfg.max_stored_prompt_chars)
        self.queues = PrefillQueues(self.cluster, self._order, self._slots, self._on_queue)
        self.ledger = KVLedger(self.cluster, self.sessions, cfg.residency_ttl_s)
        self.sessions.on_evict = self.ledger.forget  # a session forgotten for the cap: its binding and KV go
        self.engine_signals = EngineSignals(self.cluster, cfg.decode_kv_tokens, on_retention=self.ledger.learn_retention)
        self.health_state = WorkerHealth(self.eps, self.cluster, self.metrics, self.queues, self.ledger, self.sessions,
                                         cfg.health_slow_checks)
        self.outliers = OutlierDetector(list(self.eps), self.metrics, self._eject, failures=cfg.eject_after_failures,
                                        base_s=cfg.eject_base_s, max_s=cfg.eject_max_s)
        self.health_state.outliers = self.outliers
        self.accounting = RoundAccounting(cfg, self.cluster, policy, cost_model, self.metrics, self.ledger)
        self.model_card: dict | None = {"id": cfg.model, "object": "model"} if cfg.model else None
        failover = None
        if cfg.engine == "vllm" and cfg.failover_limit > 0:
            failover = StreamFailover(self.cluster, self.upstreams, self.ledger, self.metrics, limit=cfg.failover_limit,
                                      kv_connector=cfg.kv_connector, stall_timeout_s=cfg.stall_timeout_s,
                                      suspect=self.outliers.suspect, mark_dead=self.health_state.mark_dead,
                                      model=lambda: (self.model_card or {}).get("id"))
        self.io = RoundIO(self.eps, self.upstreams, self.cluster, self.queues, self.metrics, self.accounting, cost_model,
                          self.outliers, cfg.stall_timeout_s, failover)
        # The round executor is chosen once, from the engine the workers run.
        executor = make_executor(cfg, self.io, model=lambda: (self.model_card or {}).get("id"))
        self.refit: OnlineRefit | None = None
        if cfg.refit_online or cfg.refit_out:
            self.refit = OnlineRefit(cost_model, self.cluster, min_samples=cfg.refit_min_samples,
                                     max_step=cfg.refit_max_step, interval_s=cfg.refit_interval_s, out_path=cfg.refit_out)
            self.accounting.observers.append(self.refit.observe)
        self.retention = RetentionReleaser(self.upstreams, self.metrics, lambda: (self.model_card or {}).get("id"))
        if cfg.engine == "vllm" and cfg.kv_connector == "ampd":
            self.accounting.release_retention = self.retention.release
        # Shared state of router replicas (`--state redis://…`); without it, this process only.
        self.store = make_store(cfg.state, cfg.state_prefix, cfg.replica_id, cfg.state_lock_ttl_s)
        self.replication = Replication(self.store, self.cluster, self.ledger, self.sessions, policy.on_metrics,
                                       record_ttl_s=cfg.session_ttl_s, remote_inflight_s=cfg.upstream_timeout_s)
        self.replication.attach(self.accounting)
        self._dropped_seen = 0
        self._evictions_seen: dict[str, int] = {}
        self._export_limits()
        self.rounds = RoundRunner(cfg, self.cluster, self.sessions, self.queues, RoundPlanner(cfg, self.cluster, policy, self.metrics, self.outliers.suspect),
                                  executor, self.io, self.accounting, self.health_state, counter, self.replication)
        self._bg: list[asyncio.Task] = []
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

    def http_protocol(self) -> type:
        """The uvicorn protocol class (`http=`) that enforces this router's client head/body bounds."""
        c = self.cfg
        return guarded_protocol(c.max_header_bytes, c.max_headers, c.client_header_timeout_s, c.client_body_timeout_s)

    @property
    def counter(self) -> PromptCounter | None:
        return self.rounds.counter

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
        self.health_state.apply(await self.upstreams.check_all())
        card = await self.upstreams.discover_model()
        if card:
            self.model_card = {**card, "id": self.cfg.model or card.get("id")}
        if self.rounds.counter is None:
            self.rounds.counter = PromptCounter.load(self.cfg.tokenizer or _local_dir((card or {}).get("root")))
        if self.cfg.max_prompt_tokens is None and card and isinstance(card.get("max_model_len"), int):
            self.cfg.max_prompt_tokens = card["max_model_len"]
        await self._poll_engines()
        await self.replication.start()
        if self.replication.enabled and min(self.cfg.prefill_slots, self.cfg.local_prefill_slots) < self.store.replicas():
            log.warning("%d router replicas share workers with %d prefill slot(s) per prefill worker and %d local slot(s) "
                        "per decode worker: each replica still admits at least one, so a worker may run up to one per "
                        "replica at once (raise --config prefill_slots / local_prefill_slots to a multiple of the "
                        "replica count for an exact share)", self.store.replicas(), self.cfg.prefill_slots,
                        self.cfg.local_prefill_slots)
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
        await self.store.stop()
        await self.retention.close()
        await self.upstreams.close()
        self.rounds.close()

    async def _health_tick(self, result: dict[str, bool]) -> None:
        self.health_state.tick(result)
        await self._poll_engines()
        if self.refit is not None:
            try:
                self.refit.maybe_refit()
            except Exception:  # a failed refit keeps the current model; the router keeps serving
                log.exception("online refit failed; the cost model is unchanged")

    async def _poll_engines(self) -> None:
        """Each live worker's own /metrics (running, waiting, KV usage and capacity, prefix hits)."""
        ids = [wid for wid in self.eps if self.cluster.worker(wid).alive]
        pages = await asyncio.gather(*(self.upstreams.get(wid, "/metrics") for wid in ids))
        for wid, got in zip(ids, pages):
            ok = got is not None and got[0] == 200
            self.engine_signals.apply(wid, got[1].decode("utf-8", "replace") if ok else None)

    def _capacity(self) -> int:
        try:
            return int(self.cost_model.kv_capacity_tokens(Layout()))
        except Exception:
            return 0

    def _export_limits(self) -> None:
        cfg, lim = self.cfg, self.metrics.state_limit
        lim.labels("sessions", "cap").set(cfg.max_sessions)
        lim.labels("sessions", "ttl_seconds").set(cfg.session_ttl_s)
        lim.labels("prompt_text", "cap").set(cfg.max_stored_prompt_chars)
        lim.labels("session_output_text", "cap").set(MAX_OUTPUT_CHARS)
        lim.labels("bindings", "cap").set(cfg.max_sessions)  # named bindings: one per session at most
        # None: each engine's reported retention; the connector's default until it reports
        lim.labels("residency", "ttl_seconds").set(cfg.residency_ttl_s if cfg.residency_ttl_s is not None
                                                   else CONNECTOR_DEFAULT_RETENTION_S)
        lim.labels("request_body", "cap").set(cfg.max_body_bytes)
        lim.labels("request_head", "cap").set(cfg.max_header_bytes)

    def _refresh_state_gauges(self) -> None:
        """Sizes of every table the router keeps (a leak shows as a rising line)."""
        m = self.metrics
        m.sessions.set(len(self.sessions))
        anon = sum(1 for sid in self.cluster.bindings if sid.startswith("anon-"))
        m.bindings.labels("named").set(len(self.cluster.bindings) - anon)
        m.bindings.labels("anonymous").set(anon)
        m.prompt_chars.set(self.sessions.stored_chars())
        for table, seen in (("sessions", self.sessions.evicted), ("prompt_text", self.sessions.shed)):
            m.state_evictions.labels(table).inc(seen - self._evictions_seen.get(table, 0))
            self._evictions_seen[table] = seen
        m.ejected.set(self.outliers.ejected_count())
        m.inflight.set(self.ledger.in_flight())
        st = self.store.status()
        m.state_connected.set(1 if st["connected"] else 0)
        m.replicas.set(st["replicas"])
        dropped = st.get("dropped_events", 0)
        if dropped > self._dropped_seen:
            m.state_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    def _eject(self, wid: str, why: str) -> None:
        """Outlier ejection: out of routing like a dead worker; the health check lets it back after the back-off."""
        self.health_state.mark_dead(wid, why)
        self.metrics.ejected.set(self.outliers.ejected_count())

    # ------------------------------------------------------------------------------ queues
    def _order(self, worker: WorkerState, now: float) -> list[PrefillTask] | None:
        try:
            return self.policy.order_queue(worker, now)
        except Exception as exc:  # a policy bug degrades to FIFO, never a stuck queue
            self.metrics.errors.labels("policy").inc()
            log.error("order_queue failed on %s: %s", worker.worker_id, exc)
            return None

    def _slots(self, wid: str) -> int:
        """This replica's share of the worker's prefill slots (all of them when it is the only router)."""
        slots = self.cfg.prefill_slots if wid in self.cluster.prefill else self.cfg.local_prefill_slots
        return max(1, slots // self.store.replicas())

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
            intake.authorize(request, self.cfg.api_key)
        except RouterError as e:
            return e.response()
        data = [self.model_card] if self.model_card and self.model_card.get("id") else []
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        workers = {wid: {"kind": ep.kind, "url": ep.url, "alive": self.cluster.worker(wid).alive,
                         "queue": len(self.cluster.worker(wid).queue)} for wid, ep in self.eps.items()}
        ok = bool(self.cluster.live_decode())
        # A shared store that is down does not make this replica unhealthy: it serves from local state.
        return JSONResponse({"status": "ok" if ok else "unavailable", "workers": workers, "state": self.store.status()},
                            status_code=200 if ok else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        self._refresh_state_gauges()
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return RouterError(404, f"no route {request.url.path}", "not_found").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return RouterError(405, f"method {request.method} not allowed on {request.url.path}", "method_not_allowed").response()

    async def _serve(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        t0 = time.monotonic()
        try:
            intake.authorize(request, self.cfg.api_key)
            body = await intake.read_json(request, self.cfg.max_body_bytes, self.cfg.max_json_depth)
            intake.validate(body, chat, (self.model_card or {}).get("id"))
            response, disconnected = await race_disconnect(request.receive, self.rounds.run(request.headers, body, chat, t0))
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


def _local_dir(path: Any) -> str | None:
    return path if isinstance(path, str) and os.path.isdir(path) else None
