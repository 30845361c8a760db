"""Scheduler half of the `ampd` connector (runs in vLLM's EngineCore process).

It decides, per request, how many prompt tokens come from a peer (`get_num_new_matched_tokens`), which
of our blocks receive them (`update_state_after_alloc` → a `LoadSpec` for the worker), and what a finished
request leaves behind (`request_finished`): a pin on the blocks a reader will pull (with a source
descriptor in the response), or a session's retention pin on a decode worker.

History reads (flow c, migration): the reader asks the holder's HTTP front end to *export* the history
(`POST /v1/completions`, the exact history token ids, `max_tokens=1`, role "export"). The holder's prefix
cache covers it, so it computes one token, pins the blocks and answers with their descriptor; meanwhile
`get_num_new_matched_tokens` returns None ("ask again") so the engine keeps serving other requests.

Readers report "done" to the holder's ZMQ PULL socket (`notify`); holders drain it once per step. An idle
engine does not step, so its pins then wait for the next request: harmless (nothing needs the memory while
idle) and cheaper than keeping the engine loop spinning (which would burn its core for up to `hold_ttl_s`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from ampd_plugin.connector import params as wire
from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.holds import RETAIN, SOURCE, HoldTable
from ampd_plugin.connector.vllm.metadata import (
    AMPDConnectorMetadata,
    AMPDHandshake,
    LoadSpec,
    block_span,
    external_tokens,
    history_blocks,
)

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("ampd_plugin.connector")


@dataclasses.dataclass
class _ReqState:
    params: wire.AMPDParams | None
    error: str | None = None
    source: wire.SourceDescriptor | None = None
    export: concurrent.futures.Future | None = None
    export_started: float = 0.0
    load_start: int = 0
    loading_since: float | None = None
    done: bool = False          # a load was planned (or given up); never plan another for this request
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class AMPDScheduler:
    def __init__(self, vllm_config, cfg: AMPDConnectorConfig, engine_id: str, host: str):
        import zmq

        self.cfg = cfg
        self.engine_id = engine_id
        self.block_size = vllm_config.cache_config.block_size
        name = vllm_config.model_config.served_model_name
        self.model_name = name[0] if isinstance(name, (list, tuple)) else (name or vllm_config.model_config.model)
        self._zmq = zmq.Context.instance()
        self._notify_sock = self._zmq.socket(zmq.PULL)
        self._notify_sock.setsockopt(zmq.LINGER, 0)
        if cfg.notify_port:
            self._notify_sock.bind(f"tcp://{host}:{cfg.notify_port}")
            port = cfg.notify_port
        else:
            port = self._notify_sock.bind_to_random_port(f"tcp://{host}")
        self.notify_addr = f"tcp://{host}:{port}"
        self._block_pool = None
        self._worker: AMPDHandshake | None = None
        self._holds = HoldTable(self._pin, self._unpin)
        self._reqs: dict[str, _ReqState] = {}
        self._pending: list[LoadSpec] = []
        self._pressure = False
        self._http = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ampd-export")
        log.info("ampd connector scheduler: engine %s, notify %s, block size %d", engine_id, self.notify_addr,
                 self.block_size)

    # ------------------------------------------------------------------------------------ wiring
    def bind_block_pool(self, block_pool) -> None:
        self._block_pool = block_pool

    def set_worker_info(self, info: AMPDHandshake) -> None:
        self._worker = info
        log.info("ampd connector: worker transfer engine %s, %d layers, %d B/block", info.te_session,
                 len(info.bases), info.block_bytes)

    def _pin(self, blocks) -> None:
        self._block_pool.touch(blocks)

    def _unpin(self, blocks) -> None:
        self._block_pool.free_blocks(blocks)

    # ---------------------------------------------------------------------------- per request
    def _state(self, request: "Request") -> _ReqState | None:
        st = self._reqs.get(request.request_id)
        if st is not None:
            return st
        raw = request.kv_transfer_params
        try:
            parsed = wire.parse(raw)
        except wire.ParamsError as exc:
            log.error("ampd: request %s has malformed kv_transfer_params, computing it locally: %s",
                      request.request_id, exc)
            st = _ReqState(params=None, error=f"malformed kv_transfer_params: {exc}", done=True)
            self._reqs[request.request_id] = st
            return st
        if parsed is None:
            return None
        st = _ReqState(params=parsed, source=parsed.source)
        self._reqs[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None or st.done or st.params is None:
            return 0, False
        p = st.params
        bs = self.block_size
        if p.history is not None and st.source is None:
            n_blocks = history_blocks(p.history.tokens, request.num_tokens, bs)
            if n_blocks * bs <= num_computed_tokens:
                st.stats["history_tokens_cached_here"] = num_computed_tokens
                return 0, False  # we cache at least as much as the holder could give us
            if st.export is None:
                st.export_started = time.monotonic()
                st.export = self._http.submit(self._export, p.history.source.format(),
                                              list(request.prompt_token_ids[: n_blocks * bs + 1]),
                                              f"{p.xfer or request.request_id}-h")
            if not st.export.done():
                if time.monotonic() - st.export_started > self.cfg.max_history_wait_s:
                    st.error = f"history export from {p.history.source} not answered in {self.cfg.max_history_wait_s}s"
                    st.done = True
                    return 0, False
                return None, False
            try:
                st.source = st.export.result()
                st.stats["history_export_ms"] = round(1000 * (time.monotonic() - st.export_started), 2)
            except Exception as exc:  # noqa: BLE001 - any failure means "compute it locally"
                st.error = f"history export from {p.history.source} failed, computed locally: {exc}"
                log.warning("ampd: request %s: %s", request.request_id, st.error)
                st.done = True
                return 0, False
        src = st.source
        if src is None:
            return 0, False
        problem = self._incompatible(src)
        if problem:
            st.error, st.done = problem, True
            log.error("ampd: request %s: %s", request.request_id, problem)
            return 0, False
        if src.fingerprint is not None and src.fingerprint != wire.prompt_fingerprint(
                (request.prompt_token_ids or [])[: src.tokens]):
            st.error, st.done = ("the source holds KV of a different prompt (fingerprint mismatch): "
                                 "computed locally"), True
            log.error("ampd: request %s: %s", request.request_id, st.error)
            return 0, False
        n = external_tokens(src.tokens, request.num_tokens, num_computed_tokens, bs,
                            whole_blocks_only=p.history is not None)
        st.load_start = num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def _incompatible(self, src: wire.SourceDescriptor) -> str | None:
        if self._worker is None:
            return "this worker has not registered its KV cache yet"
        if src.block_size != self.block_size:
            return f"block size differs: source {src.block_size}, here {self.block_size}"
        if src.block_bytes != self._worker.block_bytes or len(src.bases) != len(self._worker.bases):
            return (f"KV layout differs from the source ({len(src.bases)} layers x {src.block_bytes} B/block vs "
                    f"{len(self._worker.bases)} x {self._worker.block_bytes}): different model or dtype?")
        return None

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0 or st.done or st.source is None:
            return
        st.done = True
        src = st.source
        local_ids = blocks.get_block_ids()[0]
        span = block_span(st.load_start, num_external_tokens, self.block_size)
        spec = LoadSpec(req_id=request.request_id, source=src, local_blocks=[], remote_blocks=[])
        if span.stop > len(local_ids) or span.stop > len(src.blocks):
            spec.error = (f"block plan out of range (span {span.start}..{span.stop}, local {len(local_ids)}, "
                          f"source {len(src.blocks)})")
        else:
            spec.local_blocks = [local_ids[i] for i in span]
            spec.remote_blocks = [src.blocks[i] for i in span]
        st.loading_since = time.monotonic()
        layers = len(self._worker.bases) if self._worker else 0
        st.stats.update(external_tokens=num_external_tokens, read_blocks=len(spec.local_blocks),
                        read_bytes=len(spec.local_blocks) * layers * src.block_bytes, read_from=src.engine)
        self._pending.append(spec)

    def _export(self, url: str, token_ids: list[int], xfer: str) -> wire.SourceDescriptor:
        body = {"model": self.model_name, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
                "kv_transfer_params": wire.export_params(xfer)}
        req = urllib.request.Request(url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.http_timeout_s) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code} from {url}: {exc.read()[:300]!r}") from exc
        params = answer.get("kv_transfer_params")
        src = wire.response_source(params)
        if src is None:
            raise RuntimeError(f"{url} returned no source descriptor ({wire.response_error(params) or 'no ampd connector?'})")
        return src

    # --------------------------------------------------------------------------------- per step
    def build_connector_meta(self, scheduler_output) -> AMPDConnectorMetadata:
        self._drain_notices()
        self._holds.release_expired()
        if self._holds.count(RETAIN) and (self._pressure or self._free_share() < self.cfg.retention_min_free):
            key = self._holds.release_oldest(RETAIN)
            log.info("ampd: KV memory pressure, released retained blocks %s", key)
        self._pressure = False
        meta = AMPDConnectorMetadata(loads=self._pending)
        self._pending = []
        return meta

    def _free_share(self) -> float:
        if self._block_pool is None:
            return 1.0
        return 1.0 - self._block_pool.get_usage()

    def _drain_notices(self) -> None:
        import zmq

        while True:
            try:
                msg = self._notify_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                xfer = json.loads(msg)["xfer"]
            except (ValueError, KeyError, TypeError):
                log.warning("ampd: ignoring malformed notice %r", msg[:100])
                continue
            if xfer in self._holds:
                self._holds.release(xfer)

    def update_connector_output(self, output) -> None:
        now = time.monotonic()
        for req_id in output.finished_recving or ():
            st = self._reqs.get(req_id)
            if st is not None and st.loading_since is not None:
                st.stats["read_ms"] = round(1000 * (now - st.loading_since), 2)
                st.loading_since = None
        for req_id in output.failed_recving or ():
            st = self._reqs.get(req_id)
            if st is not None:
                st.error = "KV read from the source failed (see this engine's log); handled per kv_load_failure_policy"
                st.stats["read_failed"] = True

    def has_pending_block_frees(self) -> bool:
        """vLLM asks this when it cannot allocate: releasing a retention pin beats preempting a request."""
        if self._holds.count(RETAIN):
            self._pressure = True
            return True
        return False

    def reset_cache(self) -> bool:
        """`/reset_prefix_cache?reset_external=true`: drop every pin (a second reset then empties the cache)."""
        released = self._holds.release_all()
        log.info("ampd: released %d pins on cache reset", released)
        return True

    # ------------------------------------------------------------------------------ finishing
    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        st = self._reqs.pop(request.request_id, None)
        if st is None:
            return False, None
        p = st.params
        source = None
        if (p is not None and p.role in ("prefill", "export") and block_ids and self._worker is not None
                and request.status == RequestStatus.FINISHED_LENGTH_CAPPED and self._block_pool is not None):
            tokens = min(request.num_computed_tokens, len(block_ids) * self.block_size)
            self._holds.add(p.xfer, SOURCE, [self._block_pool.blocks[b] for b in block_ids], self.cfg.hold_ttl_s)
            source = wire.SourceDescriptor(
                engine=self.engine_id, te=self._worker.te_session, notify=self.notify_addr, xfer=p.xfer,
                blocks=tuple(block_ids), tokens=tokens, block_size=self.block_size,
                block_bytes=self._worker.block_bytes, bases=self._worker.bases,
                fingerprint=wire.prompt_fingerprint((request.prompt_token_ids or [])[:tokens]))
            st.stats["held_blocks"] = len(block_ids)
        elif p is not None and p.role in ("prefill", "export") and st.error is None:
            st.error = f"nothing exported (finish status {request.status.name}; send max_tokens=1)"
        if p is not None and p.session is not None and p.role in ("decode", "local"):
            self._holds.release_session(p.session)
            if (p.wants_retention and self.cfg.retention_ttl_s > 0 and block_ids and self._block_pool is not None
                    and request.status != RequestStatus.FINISHED_ABORTED):
                self._holds.add(f"retain:{request.request_id}", RETAIN,
                                [self._block_pool.blocks[b] for b in block_ids], self.cfg.retention_ttl_s,
                                session=p.session)
                st.stats["retained_blocks"] = len(block_ids)
        return False, wire.response_params(source=source, stats=st.stats, error=st.error)

    def shutdown(self) -> None:
        self._http.shutdown(wait=False, cancel_futures=True)
        self._notify_sock.close(0)
