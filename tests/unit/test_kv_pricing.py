"""Per-rank KV-transfer pricing and per-backend remote-round pricing against hand-computed numbers."""

from __future__ import annotations

import pytest

from ampd_plugin.costmodel import (
    Efficiency,
    FittedCostModel,
    GpuSpec,
    Layout,
    LayoutCoefficients,
    LinkCoefficients,
    LinkPricing,
    PrefillCoefficients,
    DecodeCoefficients,
    RooflineCostModel,
    layout_refusal,
    load_model_spec,
    pair_refusal,
    remote_round,
    remote_round_seconds,
    transfer_shape,
)
from ampd_plugin.costmodel.kv_pricing import rank_heads

GPU = GpuSpec(name="test", bf16_tflops=100, hbm_gbps=1000, memory_gb=80, nvlink_gbps=400, network_gbps=50)
EFF = Efficiency(link_efficiency=1.0, transfer_latency_s=1e-4)
LLAMA = load_model_spec("Llama-3.1-70B")  # 8 KV heads, 80 layers, head_dim 128, bf16: 327680 B/token
HEAD = 327680 // 8  # bytes per token per KV head


def test_rank_heads_split_and_replicate():
    assert rank_heads(8, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert rank_heads(2, 4) == [(0,), (0,), (1,), (1,)]  # TP > heads: each head on two ranks
    with pytest.raises(ValueError, match="divides 8"):
        rank_heads(8, 3)


def test_reader_wider_than_holder_reads_from_rank_r_div_ratio():
    shape = transfer_shape(8, src_tp=2, dst_tp=4)
    assert shape.reads == ((0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2))
    assert shape.heads_moved == 8


def test_holder_wider_than_reader_reads_from_several_ranks():
    shape = transfer_shape(8, src_tp=4, dst_tp=2)
    assert shape.reads == ((0, 0, 2), (0, 1, 2), (1, 2, 2), (1, 3, 2))
    assert shape.reader_heads() == [4, 4] and shape.holder_heads() == [2, 2, 2, 2]


def test_replicated_reader_moves_one_copy_per_rank():
    # 2 KV heads, reader TP 4: every reader rank holds one head, so 4 head-copies move (2x the KV).
    shape = transfer_shape(2, src_tp=2, dst_tp=4)
    assert shape.reads == ((0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1))
    assert shape.heads_moved == 4
    # One KV head (MQA), holder TP 4 replicated, reader TP 2: readers spread over the replicas.
    assert transfer_shape(1, src_tp=4, dst_tp=2).reads == ((0, 0, 1), (1, 2, 1))


def test_unmappable_pairs_are_refused():
    with pytest.raises(ValueError, match="one TP degree must divide the other"):
        transfer_shape(8, 3, 2)
    assert "divide" in pair_refusal(8, Layout(4), Layout(6))
    assert "same TP" in pair_refusal(8, Layout(2), Layout(4), backend="sglang")
    assert pair_refusal(8, Layout(2), Layout(4)) is None
    assert "PP=2" in layout_refusal(8, Layout(2, pp=2))
    assert "6 KV heads" in layout_refusal(6, Layout(4)) and layout_refusal(6, Layout(12)) is None


def test_roofline_transfer_times_by_hand():
    cm = RooflineCostModel(LLAMA, GPU, EFF)
    tokens = 1000
    # Same TP: each rank moves its 1/tp share over its own NIC.
    assert cm.t_kv(tokens, Layout(4), Layout(4)) == pytest.approx(1e-4 + tokens * 2 * HEAD / 50e9)
    # P TP2 -> D TP4: readers take 2 heads each, but each holder rank sends 4 heads (to two readers).
    assert cm.t_kv(tokens, Layout(2), Layout(4)) == pytest.approx(1e-4 + tokens * 4 * HEAD / 50e9)
    assert cm.t_kv(tokens, Layout(4), Layout(2)) == pytest.approx(1e-4 + tokens * 4 * HEAD / 50e9)
    # TP16 reader (replicated KV, 16 head-copies): each TP8 holder rank serves two readers: 2 heads each.
    assert cm.t_kv(tokens, Layout(8), Layout(16)) == pytest.approx(1e-4 + tokens * 2 * HEAD / 50e9)
    # NVLink: per-rank NVLink bandwidth (400/2 GB/s one direction).
    assert cm.t_kv(tokens, Layout(4), Layout(4), "nvlink") == pytest.approx(1e-4 + tokens * 2 * HEAD / 200e9)


def test_fewer_nics_than_gpus_caps_the_host():
    gpu = GpuSpec(name="2nic", bf16_tflops=100, hbm_gbps=1000, memory_gb=80, nvlink_gbps=400, network_gbps=50,
                  nics_per_node=2)
    cm = RooflineCostModel(LLAMA, gpu, EFF)
    # TP4 -> TP4: 4 ranks x 2 heads share 2 NICs of 50 GB/s: the host moves 8 heads at 100 GB/s.
    assert cm.t_kv(1000, Layout(4), Layout(4)) == pytest.approx(1e-4 + 1000 * 8 * HEAD / 100e9)
    # TP2: two ranks, two NICs: per-rank bound as before; NVLink has no NIC cap.
    assert cm.t_kv(1000, Layout(2), Layout(2)) == pytest.approx(1e-4 + 1000 * 4 * HEAD / 50e9)
    assert cm.t_kv(1000, Layout(4), Layout(4), "nvlink") == pytest.approx(1e-4 + 1000 * 2 * HEAD / 200e9)


def _fitted(heads):
    lay = Layout(1)
    return FittedCostModel(
        kv_bytes_per_token=1024,
        layouts={lay: LayoutCoefficients(lay, PrefillCoefficients(0.01, 1e-4, 0.0), DecodeCoefficients(0.005, 0, 0), 10_000)},
        links={"net": LinkCoefficients(1e-3, 1e9)}, num_key_value_heads=heads)


def test_fitted_links_are_per_rank_and_know_the_heads():
    # One KV head (MQA), TP1 -> TP2: both readers need the whole head from the single holder rank.
    assert _fitted(1).t_kv(1000, Layout(1), Layout(2)) == pytest.approx(1e-3 + 2 * 1000 * 1024 / 1e9)
    # Heads unknown: assumed to split evenly, the holder sends 1024 kB in total.
    assert _fitted(None).t_kv(1000, Layout(1), Layout(2)) == pytest.approx(1e-3 + 1000 * 1024 / 1e9)
    assert _fitted(None).t_kv(1000, Layout(2), Layout(2)) == pytest.approx(1e-3 + 1000 * 1024 / 2 / 1e9)
    # The heads survive the YAML round trip.
    again = FittedCostModel.from_yaml(_fitted(4).to_yaml())
    assert again.num_key_value_heads == 4


def test_link_bandwidth_override_is_per_rank():
    cm = LinkPricing(RooflineCostModel(LLAMA, GPU, EFF), net_gbps=10)
    assert cm.t_kv(1000, Layout(2), Layout(2)) == pytest.approx(200e-6 + 1000 * 4 * HEAD / 10e9)


class _Linear:
    """t_pre = 1 ms per computed token + 0.1 ms per cached token; t_kv = 10 ms per token."""

    def t_pre(self, l_hist, l_incr, layout):
        return 1e-3 * l_incr + 1e-4 * l_hist

    def t_kv(self, tokens, src, dst, link="net"):
        return 1e-2 * tokens


def test_remote_round_by_backend():
    cm = _Linear()
    p_vllm, p_sgl, d = Layout(1), Layout(1, backend="sglang"), Layout(1)
    # History 100, increment 10, P caches 40 of the session.
    vllm = remote_round_seconds(100, 10, 40, p_vllm, d, cm.t_pre, cm.t_kv)
    assert vllm == pytest.approx(cm.t_pre(100, 10, p_vllm) + cm.t_kv(60, d, p_vllm) + cm.t_kv(10, p_vllm, d))
    sgl = remote_round_seconds(100, 10, 40, p_sgl, d, cm.t_pre, cm.t_kv)
    assert sgl == pytest.approx(cm.t_pre(40, 70, p_sgl) + cm.t_kv(10, p_sgl, d))  # 0.074 + 0.1
    assert sgl == pytest.approx(0.174) and vllm == pytest.approx(0.72)
    assert remote_round("sglang", 110, 100, 40) == remote_round("sglang", 110, 100, 40)
    rnd = remote_round("sglang", 110, 100, 40)
    assert (rnd.read, rnd.start, rnd.compute, rnd.ship) == (0, 40, 70, 10)
    rnd = remote_round("vllm", 110, 100, 40)
    assert (rnd.read, rnd.start, rnd.compute, rnd.ship) == (60, 100, 10, 10)
    # D lost the history (evicted): SGLang ships the whole prompt; vLLM's P computes all of it.
    assert remote_round("sglang", 110, 0, 40).ship == 110
    assert remote_round("vllm", 110, 0, 40).compute == 70


def test_backend_is_not_part_of_layout_identity():
    assert Layout(2, backend="sglang") == Layout(2) and hash(Layout(2, backend="sglang")) == hash(Layout(2))
    with pytest.raises(ValueError, match="unknown backend"):
        Layout(1, backend="trt")


def test_router_workers_carry_the_engine_as_layout_backend():
    """The live router's policy prices SGLang workers' remote rounds as SGLang runs them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from policy_fakes import FakeCost

    from ampd_plugin.router.config import RouterConfig
    from ampd_plugin.router.server import Router
    from ampd_plugin.router_policy.registry import load_policy

    for engine in ("vllm", "sglang"):
        cfg = RouterConfig(prefill=["http://127.0.0.1:9"], decode=["http://127.0.0.1:10"], engine=engine,
                           decode_kv_tokens=1000)
        router = Router(cfg, load_policy("ampd", FakeCost(), ttft_slo=2.0, itl_slo=0.1), FakeCost())
        workers = list(router.cluster.prefill.values()) + list(router.cluster.decode.values())
        assert {w.layout.backend for w in workers} == {engine}
