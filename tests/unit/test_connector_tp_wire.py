"""Tensor parallelism on the KV plane without engines: descriptors that carry every holder rank and the
(signed) head layout, per-rank "done" notices, per-head read descriptors, and the scheduler/worker halves
deciding what a rank reads and when a holder may unpin."""

from __future__ import annotations

import time
import types

import pytest

from ampd_plugin.connector import params as W
from ampd_plugin.connector import topology as T
from ampd_plugin.connector.auth import AuthError, ClusterAuth

SECRET = b"0123456789abcdef-unit-test-secret"
RANK1 = {"te": "127.0.0.1:15001", "bases": [9 << 20, 10 << 20]}


def _src(**over) -> W.SourceDescriptor:
    d = dict(engine="e1", te="127.0.0.1:15000", notify="tcp://127.0.0.1:16000", xfer="xfer-1", blocks=[3, 4],
             tokens=200, block_size=128, block_bytes=4096, bases=[1 << 20, 2 << 20], expires=2000.0, lease_s=10.0,
             tp=2, kv_heads=2, head_bytes=4096, ranks=[RANK1])
    d.update(over)
    return W.SourceDescriptor.from_dict(d)


def test_descriptor_carries_every_rank_and_round_trips():
    src = _src()
    assert src.tp_size == 2 and src.rank_memory(0) == ("127.0.0.1:15000", (1 << 20, 2 << 20))
    assert src.rank_memory(1) == ("127.0.0.1:15001", (9 << 20, 10 << 20))
    assert W.SourceDescriptor.from_dict(src.to_dict()) == src
    old = _src(tp=None, kv_heads=None, head_bytes=None, ranks=[])  # a TP-1 holder without layout: still valid
    assert old.tp_size == 1 and "ranks" not in old.to_dict() and "tp" not in old.to_dict()


@pytest.mark.parametrize("over,match", [
    ({"ranks": []}, "ranks 1..tp-1"),
    ({"ranks": [RANK1, RANK1]}, "ranks 1..tp-1"),
    ({"ranks": [{"te": "127.0.0.1:15001", "bases": [1]}]}, "layers"),
    ({"ranks": [{"te": "nohost", "bases": [1, 2]}]}, "host:port"),
    ({"ranks": [{"te": "127.0.0.1:1", "bases": [1, 2], "x": 1}]}, "must be"),
    ({"head_bytes": None}, "go together"),
    ({"head_bytes": 1000}, "local heads"),
    ({"tp": 0}, "1..256"),
    ({"tp": 1000}, "1..256"),
    ({"kv_heads": 0}, "positive"),
])
def test_descriptor_layout_is_checked(over, match):
    with pytest.raises(W.ParamsError, match=match):
        _src(**over)


@pytest.mark.parametrize("field,value", [("tp", 1), ("kv_heads", 4), ("head_bytes", 2048),
                                         ("ranks", (("127.0.0.1:15666", (9 << 20, 10 << 20)),))])
def test_signature_covers_the_tp_layout(field, value):
    auth = ClusterAuth(SECRET)
    signed = auth.sign_source(_src())
    auth.verify_source(signed)
    altered = W.SourceDescriptor(**{**signed.__dict__, field: value})
    with pytest.raises(AuthError, match="signature"):
        auth.verify_source(altered)


def test_ranked_done_notices_are_signed():
    reader, holder = ClusterAuth(SECRET), ClusterAuth(SECRET)
    assert holder.read_notice(reader.notice("done", "x1", 1, 2)) == ("done", "x1", 1, 2)
    assert holder.read_notice(reader.notice("done", "x2")) == ("done", "x2", 0, 1)
    assert holder.check_notice(reader.notice("done", "x3", 1, 4)) == ("done", "x3")
    import json

    body = json.loads(reader.notice("done", "x4", 0, 2))
    body["of"] = 1  # claim "all ranks done" after one: refused, the MAC covers the rank fields
    with pytest.raises(AuthError, match="signature"):
        holder.read_notice(json.dumps(body).encode())
    for rank, of in [(2, 2), (-1, 2), (0, 0), (0, 10_000), (True, 2)]:
        with pytest.raises(AuthError, match="rank"):
            holder.read_notice(json.dumps({"k": "done", "xfer": "x", "n": f"n{rank}{of}", "exp": time.time() + 5,
                                           "r": rank, "of": of}).encode())


def test_slice_descriptors_whole_blocks_equal_the_block_reads():
    from ampd_plugin.connector.vllm.metadata import read_descriptors, slice_descriptors

    whole = [T.HeadSlice(0, 0, 0, 2)]
    assert slice_descriptors([4, 5, 9], [10, 11, 12], (1000, 2000), (5000, 6000), 10, 10, 5, whole) == \
        read_descriptors([4, 5, 9], [10, 11, 12], (1000, 2000), (5000, 6000), 10)


def test_slice_descriptors_cut_heads_out_of_blocks():
    from ampd_plugin.connector.vllm.metadata import slice_descriptors

    # reader rank holds 1 head (block 8 B), holder holds 2 heads (block 16 B); we want the holder's head 1
    # (local blocks 0, 1 are adjacent, but the holder's head 1 of blocks 2 and 3 is not: two runs)
    lo, re, ln = slice_descriptors([0, 1], [2, 3], (100,), (1000,), 8, 16, 8, [T.HeadSlice(0, 1, 0, 1)])
    assert list(zip(lo, re, ln)) == [(100, 1000 + 2 * 16 + 8, 8), (108, 1000 + 3 * 16 + 8, 8)]
    # both heads of adjacent holder blocks into one reader holding both: a single run
    assert slice_descriptors([0, 1], [2, 3], (100,), (1000,), 16, 16, 8, [T.HeadSlice(0, 0, 0, 2)]) == \
        ([100], [1032], [32])
    # reader with 2 heads reading from two holder ranks, one head each: its blocks get both halves
    lo0, re0, _ = slice_descriptors([7], [3], (0,), (500,), 16, 8, 8, [T.HeadSlice(0, 0, 0, 1)])
    lo1, re1, _ = slice_descriptors([7], [3], (0,), (900,), 16, 8, 8, [T.HeadSlice(1, 0, 1, 1)])
    assert (lo0, re0, lo1, re1) == ([112], [524], [120], [924])


# ------------------------------------------------------------------------------- the two halves
class _Pool:
    def __init__(self, n):
        self.blocks = [types.SimpleNamespace(block_id=i, ref_cnt=0) for i in range(n)]

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            b.ref_cnt -= 1

    def get_usage(self):
        return 0.0


def _scheduler(tp: int, kv_heads: int = 2):
    pytest.importorskip("vllm")
    from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
    from ampd_plugin.connector.vllm.metadata import AMPDHandshake
    from ampd_plugin.connector.vllm.scheduler import AMPDScheduler

    vcfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=128),
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=tp),
                                 model_config=types.SimpleNamespace(served_model_name=["m"], model="m",
                                                                    get_total_num_kv_heads=lambda: kv_heads))
    sched = AMPDScheduler(vcfg, AMPDConnectorConfig(), f"engine-tp{tp}", "127.0.0.1")
    local = max(1, kv_heads // tp)
    sched.set_worker_info({r: AMPDHandshake(te_session=f"127.0.0.1:{15100 + r}", bases=(1 << 20, 2 << 20),
                                            block_bytes=4096 * local, num_blocks=64, tp_rank=r, tp_size=tp,
                                            kv_heads=kv_heads, head_bytes=4096) for r in range(tp)})
    return sched


def test_scheduler_needs_every_rank_and_describes_them():
    sched = _scheduler(2)
    try:
        fields = sched._layout_fields()
        assert fields == {"tp": 2, "kv_heads": 2, "head_bytes": 4096,
                          "ranks": (("127.0.0.1:15101", (1 << 20, 2 << 20)),)}
        sched._worker = None
        sched.set_worker_info({0: sched._ranks[0]})  # rank 1 missing: no transfers rather than half of them
        assert sched._worker is None and "not registered" in sched._incompatible(_src())
    finally:
        sched.shutdown()


def test_scheduler_accepts_mappable_layouts_and_explains_the_rest():
    one, two = _scheduler(1), _scheduler(2)
    try:
        src2 = _src(block_bytes=4096, head_bytes=4096)             # TP 2 holder, 1 head per rank
        src1 = _src(tp=1, block_bytes=8192, head_bytes=4096, ranks=[])
        assert one._incompatible(src2) is None and two._incompatible(src1) is None
        assert two._incompatible(src2) is None
        assert "different models" in one._incompatible(_src(kv_heads=4, tp=4, ranks=[RANK1] * 3, block_bytes=4096))
        bare = _src(kv_heads=None, head_bytes=None)
        assert "describes no KV-head layout" in one._incompatible(bare)
        assert two._incompatible(bare) is None  # same TP: whole blocks, as before layouts were described
        assert "head size differs" in one._incompatible(_src(block_bytes=2048, head_bytes=2048))
    finally:
        one.shutdown()
        two.shutdown()


def test_holder_unpins_only_after_every_reader_rank_is_done():
    from ampd_plugin.connector.vllm.holds import SOURCE
    from ampd_plugin.connector.vllm.sockets import PushSockets

    sched = _scheduler(1)
    pool = _Pool(8)
    sched.bind_block_pool(pool)
    push = PushSockets()
    try:
        sched._holds.add("x-tp", SOURCE, pool.blocks[:2], 30)
        reader = sched._auth

        def deliver(msg):
            push.send(sched.notify_addr, msg)
            for _ in range(50):
                time.sleep(0.02)
                sched._drain_notices()
                if sched._done_ranks.get("x-tp") or "x-tp" not in sched._holds:
                    return

        deliver(reader.notice("done", "x-tp", 1, 2))
        assert "x-tp" in sched._holds and pool.blocks[0].ref_cnt == 1
        deliver(reader.notice("done", "x-tp", 1, 2))  # the same rank again does not count twice
        assert "x-tp" in sched._holds
        deliver(reader.notice("done", "x-tp", 0, 2))
        assert "x-tp" not in sched._holds and pool.blocks[0].ref_cnt == 0 and not sched._done_ranks
        sched._holds.add("x-ttl", SOURCE, pool.blocks[2:3], 30)
        deliver(reader.notice("done", "x-ttl", 0, 2))
        sched._holds.release("x-ttl")  # e.g. its lease lapsed: the tally goes with it
        sched.build_connector_meta(None)
        assert sched.counts()["done_ranks"] == 0
    finally:
        push.close_all()
        sched.shutdown()


class _RecordingTE:
    def __init__(self):
        self.reads = []

    def read(self, peer, lo, re, ln, timeout_s=None):
        self.reads.append((peer, list(lo), list(re), list(ln)))
        return sum(ln)

    def close(self):
        return None


@pytest.mark.parametrize("holder_tp,reader_tp,rank,peers", [(2, 1, 0, ["127.0.0.1:15000", "127.0.0.1:15001"]),
                                                             (1, 2, 1, ["127.0.0.1:15000"]),
                                                             (2, 2, 1, ["127.0.0.1:15001"])])
def test_worker_rank_reads_its_heads_from_the_right_holder_ranks(holder_tp, reader_tp, rank, peers):
    pytest.importorskip("vllm")
    from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
    from ampd_plugin.connector.vllm.metadata import AMPDHandshake, LoadSpec
    from ampd_plugin.connector.vllm.worker import AMPDWorker, RankLayout

    heads, hb = 2, 4096
    w = AMPDWorker(AMPDConnectorConfig(), "127.0.0.1", 64, RankLayout(rank, reader_tp, heads, heads // reader_tp))
    try:
        w.te = _RecordingTE()
        w.handshake = AMPDHandshake(te_session="127.0.0.1:15200", bases=(0, 1 << 30), block_bytes=hb * heads // reader_tp,
                                    num_blocks=64, tp_rank=rank, tp_size=reader_tp, kv_heads=heads, head_bytes=hb)
        src = _src(tp=holder_tp, block_bytes=hb * heads // holder_tp, head_bytes=hb,
                   ranks=[RANK1] if holder_tp == 2 else [])
        spec = LoadSpec(req_id="r", source=src, local_blocks=[5, 6], remote_blocks=[3, 4])
        nbytes = w._read_ranks(w._plan(spec))
        assert sorted(r[0] for r in w.te.reads) == peers
        assert nbytes == 2 * 2 * w.handshake.block_bytes  # layers x blocks x our own heads: all of them
        if holder_tp == 1 and reader_tp == 2:  # rank 1 reads holder head 1: offset one head into each block
            _, lo, re, ln = w.te.reads[0]
            assert re[0] == (1 << 20) + 3 * 2 * hb + hb and ln[0] == hb
    finally:
        w.shutdown()


def test_transfer_engine_threads_start_unpinned():
    """A worker pinned to one core starts Mooncake from a thread allowed on every core; it keeps its own pin."""
    import os

    from ampd_plugin.connector.transfer import start_unpinned

    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs Linux affinity and two CPUs")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        seen = start_unpinned(lambda: os.sched_getaffinity(0))
        assert len(seen) > 1 and os.sched_getaffinity(0) == {min(before)}
        with pytest.raises(KeyError):
            start_unpinned(lambda: {}["missing"])
    finally:
        os.sched_setaffinity(0, before)
