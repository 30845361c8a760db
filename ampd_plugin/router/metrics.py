"""Prometheus metrics of the router, in a registry of its own (several routers may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "ampd_router_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.rounds = Counter(p + "rounds", "Rounds routed (a round = one prefill + its decode)", ["first"], registry=r)
        self.routes = Counter(p + "routes", "Routes chosen per worker", ["route", "worker", "reason"], registry=r)
        self.ttft = Histogram(p + "ttft_seconds", "TTFT per prefilling worker", ["worker", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "itl_seconds", "Per-round TPOT per decode worker", ["worker"], buckets=_ITL_BUCKETS, registry=r)
        self.queue_len = Gauge(p + "queue_length", "Prefills waiting in the router's queue per worker", ["worker"], registry=r)
        self.reorders = Counter(p + "reorderings", "Dispatches where the policy ran a task other than the oldest", ["worker"], registry=r)
        self.kv_bytes = Counter(p + "kv_bytes_moved", "KV bytes moved between workers (estimated from tokens)", ["kind"], registry=r)
        self.errors = Counter(p + "errors", "Errors by kind", ["kind"], registry=r)
        self.failovers = Counter(p + "stream_failovers", "Streams that broke mid-round, by worker and outcome "
                                 "(continued elsewhere, no_worker, limit, not_continuable)", ["worker", "outcome"], registry=r)
        self.rebinds = Counter(p + "session_rebinds", "Sessions rebound to another decode worker", ["reason"], registry=r)
        self.sessions = Gauge(p + "sessions", "Sessions remembered by the router", registry=r)
        self.worker_up = Gauge(p + "worker_up", "1 when the worker's health check passes", ["worker", "kind"], registry=r)
        self.worker_failures = Counter(p + "worker_failures", "Failed engine requests (5xx, timeout, stall, broken)",
                                       ["worker", "kind"], registry=r)
        self.ejections = Counter(p + "worker_ejections", "Times a worker was ejected by outlier detection", ["worker"], registry=r)
        self.ejected = Gauge(p + "workers_ejected", "Workers currently ejected by outlier detection", registry=r)
        # State sizes: every table the router keeps, so a leak shows on a dashboard.
        self.bindings = Gauge(p + "bindings", "Session -> decode worker bindings held", ["kind"], registry=r)
        self.prompt_chars = Gauge(p + "stored_prompt_chars", "Characters of last prompts and outputs kept for incremental counting", registry=r)
        self.inflight = Gauge(p + "rounds_in_flight", "Rounds between intake and their accounting", registry=r)
        # ... and the bounds they are held to, so an operator sees how close each one is to its limit.
        self.state_limit = Gauge(p + "state_limit", "Bounds of the router's tables: kind=cap (entries or characters) "
                                 "or ttl_seconds", ["table", "kind"], registry=r)
        self.state_evictions = Counter(p + "state_evictions", "Entries dropped for a cap (sessions: forgotten; "
                                       "prompt_text: kept as digests)", ["table"], registry=r)
        # What the KV plane really did (router/ledger.py, router/retention.py).
        self.recomputed = Counter(p + "history_recomputed_tokens", "History tokens a holder recomputed for an export "
                                  "(it no longer cached them)", ["worker"], registry=r)
        self.residency = Counter(p + "residency_dropped", "Session residencies dropped", ["reason"], registry=r)
        self.retention_releases = Counter(p + "retention_releases", "Retention pins released on a worker a session "
                                          "migrated away from", ["outcome"], registry=r)

        # Router replicas sharing state (router/redis_store.py).
        self.state_connected = Gauge(p + "state_connected", "1 when the shared state store answers (always 1 "
                                     "without --state)", registry=r)
        self.replicas = Gauge(p + "replicas", "Live router replicas sharing the state store (this one included)", registry=r)
        self.state_dropped = Counter(p + "state_events_dropped", "Events not shared with other replicas (store down "
                                     "or buffer full)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
