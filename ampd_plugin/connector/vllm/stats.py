"""Transfer counters of the `ampd` connector, in vLLM's connector-stats pipeline and in Prometheus.

Workers count the KV they READ (every transfer in this connector is a read by the worker that needs the
KV, so "bytes read by D" = "bytes moved to D"). vLLM ships the counters to the API server every step;
it logs them ("KV Transfer metrics: ...") and `AMPDPromMetrics` exports them on `/metrics` as
`vllm:ampd_kv_read_bytes_total`, `vllm:ampd_kv_read_blocks_total`, `vllm:ampd_kv_reads_total`,
`vllm:ampd_kv_read_failures_total` and `vllm:ampd_kv_read_seconds` (histogram), plus the safety counters
of `SAFETY_COUNTERS` as `vllm:ampd_<name>_total` (leases, refusals, recomputed exports; counted by the
scheduler half and merged by vLLM with the workers' stats), and the gauge `vllm:ampd_retention_ttl_seconds`
(how long this engine pins a finished session round's blocks: the router's residency follows it).
Per-request figures come back in each response's ``kv_transfer_params["ampd"]["stats"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

SAFETY_COUNTERS = {
    "lease_renewals_sent": "Lease renewals this engine sent for reads it was waiting to do.",
    "lease_renewals_received": "Lease renewals this engine accepted for blocks it exported.",
    "lease_expiries": "Exported blocks whose lease lapsed before the reader said it was done.",
    "lease_abandoned_reads": "Reads abandoned because the source's lease had (or might have) lapsed; computed locally.",
    "notices_refused": "Done/renew notices refused (unsigned, forged, expired, replayed or malformed).",
    "descriptors_refused": "Source descriptors refused (unsigned or bad signature); computed locally.",
    "peers_refused": "history.from URLs refused because they are not known peers.",
    "exports_refused": "History exports refused to an unauthenticated caller.",
    "export_recomputes": "History exports that had to recompute part of the history here (not cached).",
    "export_recomputed_tokens": "Tokens recomputed here for history exports.",
}
_COUNTERS = ("read_bytes", "read_blocks", "reads", "read_failures", *SAFETY_COUNTERS)


@dataclasses.dataclass
class AMPDKVConnectorStats(KVConnectorStats):
    """``data``: the counters above plus ``read_seconds`` (list of per-read durations)."""

    def __post_init__(self):
        if not self.data:
            self.reset()

    def reset(self):
        self.data = {name: 0 for name in _COUNTERS}
        self.data["read_seconds"] = []

    def record_read(self, nbytes: int, nblocks: int, seconds: float) -> None:
        if "reads" not in self.data:
            self.reset()
        self.data["read_bytes"] += nbytes
        self.data["read_blocks"] += nblocks
        self.data["reads"] += 1
        self.data["read_seconds"].append(seconds)

    def record_failure(self) -> None:
        self.count("read_failures")

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of ``_COUNTERS``)."""
        if "reads" not in self.data:
            self.reset()
        self.data[name] = self.data.get(name, 0) + n

    def clone_and_reset(self) -> "AMPDKVConnectorStats":
        out = AMPDKVConnectorStats(data={k: (list(v) if isinstance(v, list) else v) for k, v in self.data.items()})
        self.reset()
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _COUNTERS)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in _COUNTERS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        self.data.setdefault("read_seconds", []).extend(other.data.get("read_seconds", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        secs = self.data.get("read_seconds", [])
        out: dict[str, int | float] = {name: self.data.get(name, 0) for name in _COUNTERS
                                       if name not in SAFETY_COUNTERS or self.data.get(name, 0)}
        out["avg_read_ms"] = round(1000 * sum(secs) / len(secs), 3) if secs else 0.0
        out["MB_read"] = round(self.data.get("read_bytes", 0) / 2**20, 3)
        return out


class AMPDPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        from vllm.v1.metrics.utils import create_metric_per_engine

        def counter(name: str, doc: str):
            return create_metric_per_engine(
                self._counter_cls(name=name, documentation=doc, labelnames=labelnames), per_engine_labelvalues)

        self._counters = {
            "read_bytes": counter("vllm:ampd_kv_read_bytes", "Bytes of KV cache read from peers by the ampd connector."),
            "read_blocks": counter("vllm:ampd_kv_read_blocks", "KV blocks read from peers by the ampd connector."),
            "reads": counter("vllm:ampd_kv_reads", "Successful batched KV reads by the ampd connector."),
            "read_failures": counter("vllm:ampd_kv_read_failures", "Failed KV reads by the ampd connector."),
            **{name: counter(f"vllm:ampd_{name}", doc) for name, doc in SAFETY_COUNTERS.items()},
        }
        self._seconds = create_metric_per_engine(
            self._histogram_cls(name="vllm:ampd_kv_read_seconds", documentation="Duration of one batched KV read.",
                                buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
                                labelnames=labelnames),
            per_engine_labelvalues)
        self._publish_retention(vllm_config, labelnames, per_engine_labelvalues, create_metric_per_engine)

    def _publish_retention(self, vllm_config, labelnames, per_engine_labelvalues, create_metric_per_engine) -> None:
        from ampd_plugin.connector.vllm.config import AMPDConnectorConfig

        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config", None)
        try:
            ttl = AMPDConnectorConfig.from_extra_config(extra).retention_ttl_s
        except ValueError:
            return  # the connector itself refuses this configuration at start-up
        gauge = create_metric_per_engine(self._gauge_cls(
            name="vllm:ampd_retention_ttl_seconds", multiprocess_mode="mostrecent", labelnames=labelnames,
            documentation="How long the ampd connector pins a finished session round's KV blocks (0: not pinned)."),
            per_engine_labelvalues)
        for g in gauge.values():
            g.set(ttl)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        for name, metric in self._counters.items():
            value = transfer_stats_data.get(name, 0)
            if value:
                metric[engine_idx].inc(value)
        for seconds in transfer_stats_data.get("read_seconds", []):
            self._seconds[engine_idx].observe(seconds)
