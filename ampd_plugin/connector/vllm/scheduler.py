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

Safety (`auth.py`, `leases.py`): exported blocks are held under a lease that waiting readers renew; a read
is planned only while its lease is known to hold. With a cluster secret, descriptors and notices are
signed and checked and history exports are answered only for authenticated callers; ``history.from`` is
fetched only from known peers. A refusal means "compute locally" with ``kv_transfer_params.ampd.error``.
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
from ampd_plugin.connector import topology
from ampd_plugin.connector.auth import AuthError, ClusterAuth, PeerAllowList, load_secret
from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.holds import RETAIN, SOURCE, HoldTable
from ampd_plugin.connector.vllm.leases import LeaseKeeper, RenewalThread
from ampd_plugin.connector.vllm.sockets import PushSockets
from ampd_plugin.connector.vllm.stats import AMPDKVConnectorStats
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
    refused: bool = False       # an export refused to an unauthenticated caller: hold and describe nothing
    local_hit: int | None = None  # the prefix-cache hit when first matched (what an export did not recompute)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class AMPDScheduler:
    def __init__(self, vllm_config, cfg: AMPDConnectorConfig, engine_id: str, host: str):
        import zmq

        self.cfg = cfg
        self.engine_id = engine_id
        self.block_size = vllm_config.cache_config.block_size
        self.tp = vllm_config.parallel_config.tensor_parallel_size
        self.kv_heads = vllm_config.model_config.get_total_num_kv_heads()
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
        self._worker: AMPDHandshake | None = None   # rank 0 (layer count, block bytes: equal on all ranks)
        self._ranks: list[AMPDHandshake] = []
        self._done_ranks: dict[str, set[int]] = {}  # xfer -> reader ranks that reported "done" (held xfers only)
        self._holds = HoldTable(self._pin, self._unpin)
        self._reqs: dict[str, _ReqState] = {}
        self._pending: list[LoadSpec] = []
        self._pressure = False
        self._http = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ampd-export")
        self._stats = AMPDKVConnectorStats()
        self._init_safety(host)
        log.info("ampd connector scheduler: engine %s, notify %s, block size %d", engine_id, self.notify_addr,
                 self.block_size)

    # ------------------------------------------------------------------------------------ safety
    def _init_safety(self, host: str) -> None:
        self._auth = ClusterAuth(load_secret())
        self._peers = PeerAllowList(self.cfg.peers, own_hosts=[host])
        self._renew_socks = PushSockets(immediate=True)  # used by the renewal thread only
        self._leases = LeaseKeeper(lambda addr, xfer: self._renew_socks.send(addr, self._auth.notice("renew", xfer)))
        self._renewer = RenewalThread(self._leases.renew_due)
        self._expired_seen = 0
        if self._auth.enabled:
            log.info("ampd connector: cluster secret configured; descriptors, notices and exports are authenticated")
        else:
            log.warning("ampd connector: UNAUTHENTICATED (no AMPD_CLUSTER_SECRET / AMPD_CLUSTER_SECRET_FILE): any "
                        "process that reaches this engine can steer its KV transfers; use on a single host only")
        if not self.cfg.peers:
            log.info("ampd connector: history.from accepted only for this host's addresses (no peers configured)")

    def _check_request(self, st: _ReqState, request: "Request") -> None:
        """Refuse a forged descriptor, an unknown history peer or an unauthenticated export (local compute)."""
        p = st.params
        try:
            if p.source is not None:
                try:
                    self._auth.verify_source(p.source)
                except AuthError:
                    self._stats.count("descriptors_refused")
                    raise
            if p.history is not None:
                try:
                    self._peers.check(p.history.source)
                except AuthError as exc:
                    self._stats.count("peers_refused")
                    raise AuthError(f"history export from {p.history.source} refused: {exc}") from None
            if p.role == "export":
                try:
                    self._auth.verify_export(p.auth, p.xfer, list(request.prompt_token_ids or []))
                except AuthError:
                    self._stats.count("exports_refused")
                    st.refused = True
                    raise
        except AuthError as exc:
            st.error, st.done = f"{exc}; computed locally", True
            log.warning("ampd: request %s: %s", request.request_id, st.error)

    def _lease_problem(self, req_id: str, src: wire.SourceDescriptor) -> str | None:
        """Why the source's blocks may no longer be ours to read (None: the lease holds long enough)."""
        self._leases.track(req_id, src)
        deadline = self._leases.deadline(req_id)
        if deadline is None:
            return "the source descriptor carries no lease (expires/lease_s): computed locally"
        left = deadline - time.monotonic()
        if left < self.cfg.transfer_timeout_s + 1.0:
            self._leases.untrack(req_id)
            self._stats.count("lease_abandoned_reads")
            return (f"the lease on the source blocks lapsed (or has {max(left, 0):.1f}s left, less than a read "
                    "may take) before this request was scheduled: computed locally")
        return None

    def on_new_request(self, request: "Request") -> None:
        """Parse and check params on arrival, and start renewing a source's lease while the request queues."""
        st = self._state(request)
        if st is not None and st.source is not None and not st.done:
            self._leases.track(request.request_id, st.source)

    def stats(self) -> AMPDKVConnectorStats | None:
        expired = self._holds.expired[SOURCE]
        if expired > self._expired_seen:
            self._stats.count("lease_expiries", expired - self._expired_seen)
            self._expired_seen = expired
        return None if self._stats.is_empty() else self._stats.clone_and_reset()

    def counts(self) -> dict[str, int]:
        """Table sizes (leak checks): requests, pending loads, pins, tracked leases, sockets, nonces."""
        return {"requests": len(self._reqs), "pending_loads": len(self._pending),
                "source_holds": self._holds.count(SOURCE), "retain_holds": self._holds.count(RETAIN),
                "leases": len(self._leases), "renew_sockets": len(self._renew_socks),
                "done_ranks": len(self._done_ranks),
                "nonces": self._auth.replay_entries()}

    # ------------------------------------------------------------------------------------ wiring
    def bind_block_pool(self, block_pool) -> None:
        self._block_pool = block_pool

    def set_worker_info(self, ranks: dict[int, AMPDHandshake]) -> None:
        """Every TP rank's handshake (rank -> metadata); without all of them nothing is exported or read."""
        if sorted(ranks) != list(range(self.tp)):
            log.error("ampd connector: handshakes from TP ranks %s, expected 0..%d: transfers disabled",
                      sorted(ranks), self.tp - 1)
            return
        ordered = [ranks[r] for r in range(self.tp)]
        first = ordered[0]
        if any(len(h.bases) != len(first.bases) or h.block_bytes != first.block_bytes for h in ordered):
            log.error("ampd connector: TP ranks report different KV layouts: transfers disabled")
            return
        self._ranks, self._worker = ordered, first
        log.info("ampd connector: %d TP rank(s), transfer engines %s, %d layers, %d B/block (%d KV heads)",
                 self.tp, [h.te_session for h in ordered], len(first.bases), first.block_bytes, self.kv_heads)

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
        self._check_request(st, request)
        return st

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        n, load_async = self._match(request, num_computed_tokens)
        if n == 0:  # nothing will be read: stop keeping the holder's blocks alive for us
            self._untrack_lease(request.request_id)
        return n, load_async

    def _match(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None or st.done or st.params is None:
            return 0, False
        if st.local_hit is None:
            st.local_hit = num_computed_tokens
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
                                              f"{p.xfer or request.request_id}-h", request.request_id)
            if not st.export.done():
                if time.monotonic() - st.export_started > self.cfg.max_history_wait_s:
                    st.error = f"history export from {p.history.source} not answered in {self.cfg.max_history_wait_s}s"
                    st.done = True
                    return 0, False
                return None, False
            try:
                st.source, holder_stats = st.export.result()
                if holder_stats.get("export_recomputed_tokens"):
                    st.stats["history_recomputed_tokens"] = holder_stats["export_recomputed_tokens"]
                st.stats["history_export_ms"] = round(1000 * (time.monotonic() - st.export_started), 2)
            except Exception as exc:  # noqa: BLE001 - any failure means "compute it locally"
                if isinstance(exc, AuthError):
                    self._stats.count("descriptors_refused")
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
        problem = self._lease_problem(request.request_id, src)
        if problem:
            st.error, st.done = problem, True
            log.warning("ampd: request %s: %s", request.request_id, problem)
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
        me = self._worker
        if len(src.bases) != len(me.bases):
            return (f"KV layout differs from the source ({len(src.bases)} layers vs {len(me.bases)} here): "
                    "different model?")
        if src.kv_heads is None or (src.tp_size == self.tp and src.kv_heads == self.kv_heads):
            if src.tp_size != self.tp:
                return (f"the source (TP {src.tp_size}) describes no KV-head layout, so only an engine with the "
                        f"same TP can read it (this one has TP {self.tp}): computed locally")
            if src.block_bytes != me.block_bytes:
                return (f"KV layout differs from the source ({len(src.bases)} layers x {src.block_bytes} B/block vs "
                        f"{len(me.bases)} x {me.block_bytes}): different model or dtype?")
            return None
        try:
            topology.check_mappable(src.tp_size, self.tp, src.kv_heads, self.kv_heads)
        except topology.TopologyError as exc:
            return f"cannot map the source's TP {src.tp_size} onto this engine's TP {self.tp}: {exc}; computed locally"
        if src.head_bytes != me.head_bytes:
            return (f"KV head size differs from the source ({src.head_bytes} vs {me.head_bytes} B per head and block): "
                    "different dtype or head size? computed locally")
        return None

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0 or st.done or st.source is None:
            return
        st.done = True
        src = st.source
        local_ids = blocks.get_block_ids()[0]
        span = block_span(st.load_start, num_external_tokens, self.block_size)
        spec = LoadSpec(req_id=request.request_id, source=src, local_blocks=[], remote_blocks=[],
                        lease_deadline=self._leases.deadline(request.request_id))
        if span.stop > len(local_ids) or span.stop > len(src.blocks):
            spec.error = (f"block plan out of range (span {span.start}..{span.stop}, local {len(local_ids)}, "
                          f"source {len(src.blocks)})")
        else:
            spec.local_blocks = [local_ids[i] for i in span]
            spec.remote_blocks = [src.blocks[i] for i in span]
        st.loading_since = time.monotonic()
        layers = len(self._worker.bases) if self._worker else 0
        per_rank = len(spec.local_blocks) * layers * (self._worker.block_bytes if self._worker else 0)
        st.stats.update(external_tokens=num_external_tokens, read_blocks=len(spec.local_blocks),
                        read_bytes=per_rank * self.tp, read_bytes_per_rank=per_rank, read_ranks=self.tp,
                        source_tp=src.tp_size, read_from=src.engine)
        self._pending.append(spec)

    def _export(self, url: str, token_ids: list[int], xfer: str, req_id: str) -> tuple[wire.SourceDescriptor, dict]:
        body = {"model": self.model_name, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
                "kv_transfer_params": wire.export_params(xfer, self._auth.export_token(xfer, token_ids))}
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
        self._auth.verify_source(src)  # AuthError: counted by the scheduler thread
        self._leases.track(req_id, src)  # renew from now on, even if this engine does not step for a while
        return src, wire.response_stats(params)

    # --------------------------------------------------------------------------------- per step
    def build_connector_meta(self, scheduler_output) -> AMPDConnectorMetadata:
        self._drain_notices()
        self._holds.release_expired()
        if self._done_ranks:
            self._forget_released()
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
                kind, xfer, rank, of = self._auth.read_notice(msg)
            except AuthError as exc:
                self._stats.count("notices_refused")
                log.warning("ampd: notice refused: %s", exc)
                continue
            if kind == "renew":
                if self._holds.renew(xfer, self.cfg.hold_ttl_s, self.cfg.lease_max_s):
                    self._stats.count("lease_renewals_received")
            elif self._holds.kind(xfer) == SOURCE:
                done = self._done_ranks.setdefault(xfer, set())
                done.add(rank)
                if len(done) >= of:  # every reader rank has read its heads
                    self._holds.release(xfer)
                    del self._done_ranks[xfer]

    def _forget_released(self) -> None:
        """Drop rank tallies of transfers no longer held (released by their TTL or a cache reset)."""
        for xfer in [x for x in self._done_ranks if self._holds.kind(x) != SOURCE]:
            del self._done_ranks[xfer]

    def update_connector_output(self, output) -> None:
        now = time.monotonic()
        for req_id in set(output.finished_recving or ()) | set(output.failed_recving or ()):
            self._untrack_lease(req_id)
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

    def _untrack_lease(self, req_id: str) -> None:
        renewals = self._leases.untrack(req_id)
        if renewals:
            self._stats.count("lease_renewals_sent", renewals)
            st = self._reqs.get(req_id)
            if st is not None:
                st.stats["lease_renewals"] = renewals

    # ------------------------------------------------------------------------------ finishing
    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        st = self._reqs.get(request.request_id)
        if st is None:
            return False, None
        self._untrack_lease(request.request_id)
        del self._reqs[request.request_id]
        p = st.params
        source = None
        if p is not None and p.role == "export" and not st.refused:
            self._note_export_recompute(st, request)
        if st.refused:
            pass  # an unauthenticated export: no pin, no addresses
        elif (p is not None and p.role in ("prefill", "export") and block_ids and self._worker is not None
                and request.status == RequestStatus.FINISHED_LENGTH_CAPPED and self._block_pool is not None):
            tokens = min(request.num_computed_tokens, len(block_ids) * self.block_size)
            self._holds.add(p.xfer, SOURCE, [self._block_pool.blocks[b] for b in block_ids], self.cfg.hold_ttl_s)
            source = self._auth.sign_source(wire.SourceDescriptor(
                engine=self.engine_id, te=self._worker.te_session, notify=self.notify_addr, xfer=p.xfer,
                blocks=tuple(block_ids), tokens=tokens, block_size=self.block_size,
                block_bytes=self._worker.block_bytes, bases=self._worker.bases,
                fingerprint=wire.prompt_fingerprint((request.prompt_token_ids or [])[:tokens]),
                expires=round(time.time() + self.cfg.hold_ttl_s, 3), lease_s=self.cfg.hold_ttl_s,
                **self._layout_fields()))
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
        st.stats["tables"] = self.counts()  # lets operators and tests see that nothing accumulates
        return False, wire.response_params(source=source, stats=st.stats, error=st.error)

    def _layout_fields(self) -> dict[str, Any]:
        """The descriptor's TP layout: every rank's memory, TP size, KV heads, bytes per head (all signed)."""
        if self._worker.head_bytes <= 0 or self.kv_heads <= 0:
            return {}
        return {"tp": self.tp, "kv_heads": self.kv_heads, "head_bytes": self._worker.head_bytes,
                "ranks": tuple((h.te_session, h.bases) for h in self._ranks[1:])}

    def _note_export_recompute(self, st: _ReqState, request: "Request") -> None:
        """An export whose history was not cached here recomputed it (stalling this engine's batch): say so."""
        recomputed = max(0, len(request.prompt_token_ids or []) - 1 - (st.local_hit or 0))
        if recomputed:
            st.stats["export_recomputed_tokens"] = recomputed
            self._stats.count("export_recomputes")
            self._stats.count("export_recomputed_tokens", recomputed)
            log.info("ampd: history export %s recomputed %d tokens here (not cached)", st.params.xfer, recomputed)

    def shutdown(self) -> None:
        self._renewer.stop()
        self._renew_socks.close_all()
        self._http.shutdown(wait=False, cancel_futures=True)
        self._notify_sock.close(0)
