"""Engine signals: each worker's own Prometheus `/metrics`, polled on the health loop, put on its WorkerState.

The router's windows say what rounds experienced; the engine says what it is doing now — requests
running and waiting, KV cache in use (which includes the blocks the `ampd` connector pins for sessions
between rounds, so pin expiry and evictions show), prefix-cache hits, and the KV capacity it allocated
at start-up. Names per engine (checked against vLLM 0.32's endpoint; SGLang's from its metrics module):

| signal | vLLM | SGLang |
|---|---|---|
| running | `vllm:num_requests_running` | `sglang:num_running_reqs` |
| waiting | `vllm:num_requests_waiting` | `sglang:num_queue_reqs` |
| KV usage (0..1) | `vllm:kv_cache_usage_perc` | `sglang:token_usage` |
| prefix hits | `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` (counters) | `sglang:cache_hit_rate` |
| KV capacity (tokens) | `vllm:cache_config_info` labels `kv_cache_size_tokens`, else `num_gpu_blocks` × `block_size` | `sglang:max_total_num_tokens` |
| session retention TTL (s) | `vllm:ampd_retention_ttl_seconds` (the `ampd` connector's `retention_ttl_s`) | — |

Parsing uses prometheus_client's text parser. A worker whose endpoint is missing or unparsable simply
reports nothing (its fields stay None); the poll never affects liveness, which `/health` decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("ampd.router")

_MAX_METRICS_BYTES = 4 * 1024 * 1024  # a worker's /metrics page larger than this is ignored
# The series read (prefixes of sample names). The page (vLLM's is ~100 KB of histograms) is cut down to
# these lines before parsing, so a poll costs microseconds of the event loop, not milliseconds.
_WANTED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:cache_config_info",
           "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
           "sglang:max_total_num_tokens", "vllm:ampd_retention_ttl_seconds")


@dataclass
class EngineSample:
    """One poll of one engine; None = not reported."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None
    prefix_hits: float | None = None  # counter (vLLM), cumulative
    prefix_queries: float | None = None
    prefix_hit_rate: float | None = None  # gauge (SGLang)
    kv_capacity_tokens: int | None = None
    retention_ttl_s: float | None = None  # the ampd connector's pin on a finished session round


def parse(text: str) -> EngineSample:
    """The signals in one /metrics page (vLLM or SGLang; summed over engines/labels where several)."""
    out = EngineSample()
    sums: dict[str, float] = {}
    wanted = "\n".join(line for line in text.splitlines() if _is_wanted(line))
    for family in text_string_to_metric_families(wanted + "\n"):
        for sample in family.samples:
            name = sample.name
            if name == "vllm:cache_config_info":
                out.kv_capacity_tokens = _capacity_from_info(sample.labels) or out.kv_capacity_tokens
                continue
            if name == "vllm:ampd_retention_ttl_seconds":  # one per engine: the shortest, never a sum
                v = float(sample.value)
                out.retention_ttl_s = v if out.retention_ttl_s is None else min(out.retention_ttl_s, v)
                continue
            if name.endswith("_created"):
                continue
            sums[name] = sums.get(name, 0.0) + float(sample.value)
    running = _first(sums, "vllm:num_requests_running", "sglang:num_running_reqs")
    waiting = _first(sums, "vllm:num_requests_waiting", "sglang:num_queue_reqs")
    out.running = int(running) if running is not None else None
    out.waiting = int(waiting) if waiting is not None else None
    out.kv_usage = _first(sums, "vllm:kv_cache_usage_perc", "sglang:token_usage")
    out.prefix_hits = _first(sums, "vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits")
    out.prefix_queries = _first(sums, "vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries")
    out.prefix_hit_rate = _first(sums, "sglang:cache_hit_rate")
    if out.kv_capacity_tokens is None:
        cap = _first(sums, "sglang:max_total_num_tokens")
        out.kv_capacity_tokens = int(cap) if cap else None
    return out


def _is_wanted(line: str) -> bool:
    if line.startswith("# "):  # "# TYPE name kind" / "# HELP name text"
        parts = line.split(" ", 3)
        return len(parts) > 2 and parts[2].startswith(_WANTED)
    return line.startswith(_WANTED)


def _first(values: dict[str, float], *names: str) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _capacity_from_info(labels: dict[str, str]) -> int | None:
    def num(key: str) -> int | None:
        try:
            v = int(float(labels.get(key, "")))
            return v if v > 0 else None
        except ValueError:
            return None

    tokens = num("kv_cache_size_tokens")
    if tokens:
        return tokens
    blocks, block = num("num_gpu_blocks"), num("block_size")
    return blocks * block if blocks and block else None


class EngineSignals:
    """Applies polls to the cluster: engine fields, hit rate between polls, and KV capacity.

    `fixed_capacity`: decode workers' KV capacity set by the operator (`decode_kv_tokens`); the engine's
    own figure is used only when it is None.
    """

    def __init__(self, cluster, fixed_capacity: int | None, on_retention=None) -> None:
        self.cluster = cluster
        self.fixed_capacity = fixed_capacity
        self.on_retention = on_retention  # (worker id, seconds): the connector's retention TTL, when reported
        self._last_prefix: dict[str, tuple[float, float]] = {}

    def apply(self, worker_id: str, text: str | None) -> None:
        w = self.cluster.worker(worker_id)
        if text is None or len(text) > _MAX_METRICS_BYTES:
            w.engine_running = w.engine_waiting = w.engine_kv_usage = None
            return
        try:
            s = parse(text)
        except Exception as exc:  # noqa: BLE001 - a page we cannot read is "not reported"
            log.debug("cannot parse /metrics of %s: %s", worker_id, exc)
            w.engine_running = w.engine_waiting = w.engine_kv_usage = None
            return
        w.engine_running, w.engine_waiting = s.running, s.waiting
        if s.retention_ttl_s is not None and self.on_retention is not None:
            self.on_retention(worker_id, s.retention_ttl_s)
        w.engine_kv_usage = min(1.0, max(0.0, s.kv_usage)) if s.kv_usage is not None else None
        if s.prefix_hit_rate is not None:
            w.engine_prefix_hit_rate = s.prefix_hit_rate
        elif s.prefix_hits is not None and s.prefix_queries is not None:
            hits0, queries0 = self._last_prefix.get(worker_id, (0.0, 0.0))
            dq = s.prefix_queries - queries0
            if dq > 0:
                w.engine_prefix_hit_rate = max(0.0, min(1.0, (s.prefix_hits - hits0) / dq))
            self._last_prefix[worker_id] = (s.prefix_hits, s.prefix_queries)
        if w.kind == "decode" and self.fixed_capacity is None and s.kv_capacity_tokens:
            if w.kv_capacity_tokens != s.kv_capacity_tokens:
                log.info("decode worker %s: KV capacity %d tokens (reported by the engine)", worker_id,
                         s.kv_capacity_tokens)
            w.kv_capacity_tokens = s.kv_capacity_tokens
