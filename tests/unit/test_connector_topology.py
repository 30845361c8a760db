"""The TP mapping between a KV holder and a reader: every reader rank gets exactly the heads it holds."""

from __future__ import annotations

import itertools

import pytest

from ampd_plugin.connector import topology as T


def _global_heads_read(holder_tp, reader_tp, heads, rank):
    """Global head ids a reader rank's plan copies, in its local order (checked against what it holds)."""
    got = []
    for s in T.plan_rank(holder_tp, reader_tp, heads, rank):
        first, count = T.heads_of_rank(holder_tp, s.holder_rank, heads)
        assert 0 <= s.holder_head and s.holder_head + s.count <= count
        got += [(s.reader_head + i, first + s.holder_head + i) for i in range(s.count)]
    return [g for _, g in sorted(got)]


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("holder_tp,reader_tp", list(itertools.product([1, 2, 4, 8], repeat=2)))
def test_every_reader_rank_reads_exactly_its_own_heads(heads, holder_tp, reader_tp):
    for r in range(reader_tp):
        first, count = T.heads_of_rank(reader_tp, r, heads)
        assert _global_heads_read(holder_tp, reader_tp, heads, r) == list(range(first, first + count))


def test_same_tp_reads_whole_blocks_from_the_same_rank():
    assert T.plan(2, 2, 8) == [[T.HeadSlice(0, 0, 0, 4)], [T.HeadSlice(1, 0, 0, 4)]]


def test_reader_tp_larger_reads_its_slice_from_rank_r_over_ratio():
    # holder TP 1 (8 heads), reader TP 4 (2 heads each): rank r reads heads 2r..2r+1 of holder rank 0
    assert T.plan(1, 4, 8) == [[T.HeadSlice(0, 2 * r, 0, 2)] for r in range(4)]
    assert [s.holder_rank for r in T.plan(2, 4, 8) for s in r] == [0, 0, 1, 1]


def test_holder_tp_larger_reads_from_several_holder_ranks():
    # holder TP 4 (2 heads each), reader TP 1: four slices, one per holder rank, in head order
    assert T.plan(4, 1, 8) == [[T.HeadSlice(k, 0, 2 * k, 2) for k in range(4)]]
    assert T.plan(2, 1, 2) == [[T.HeadSlice(0, 0, 0, 1), T.HeadSlice(1, 0, 1, 1)]]


def test_replicated_kv_spreads_readers_over_replicas():
    # 1 KV head (MQA): every rank of every side holds head 0
    assert T.plan(2, 2, 1) == [[T.HeadSlice(0, 0, 0, 1)], [T.HeadSlice(1, 0, 0, 1)]]
    assert T.plan(1, 2, 1) == [[T.HeadSlice(0, 0, 0, 1)], [T.HeadSlice(0, 0, 0, 1)]]
    assert T.plan(2, 1, 1) == [[T.HeadSlice(0, 0, 0, 1)]]
    # 2 heads on TP 4: ranks 0,1 hold head 0 and ranks 2,3 head 1
    assert [T.heads_of_rank(4, r, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert T.plan(4, 1, 2) == [[T.HeadSlice(0, 0, 0, 1), T.HeadSlice(2, 0, 1, 1)]]


@pytest.mark.parametrize("tp,heads", [(3, 8), (6, 4), (3, 2), (0, 2)])
def test_unshardable_tp_is_refused_with_what_would_work(tp, heads):
    with pytest.raises(T.TopologyError) as exc:
        T.plan(tp, 1, heads)
    assert "TP" in str(exc.value) or ">= 1" in str(exc.value)


def test_different_head_counts_are_refused():
    with pytest.raises(T.TopologyError, match="different models"):
        T.check_mappable(2, 1, 8, 4)
    T.check_mappable(2, 4, 8, 8)


@pytest.mark.parametrize("kw,match", [({"pp": 2}, "pipeline-parallel"), ({"pcp": 2}, "context parallel"),
                                      ({"dcp": 2}, "context parallel"), ({"kv_groups": 2}, "hybrid"),
                                      ({"attention_only": False}, "SSM")])
def test_unsupported_engines_are_refused_at_start_up(kw, match):
    with pytest.raises(T.TopologyError, match=match):
        T.check_engine(**kw)
    T.check_engine()
