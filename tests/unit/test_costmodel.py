"""Cost model against hand-computed values (formulas in ampd_plugin/costmodel/roofline.py's docstring)."""

from __future__ import annotations

import json

import pytest

from ampd_plugin.costmodel import (
    DecodeCoefficients,
    Efficiency,
    FittedCostModel,
    GpuSpec,
    Layout,
    LayoutCoefficients,
    LinkCoefficients,
    ModelSpec,
    PrefillCoefficients,
    RooflineCostModel,
    build_cost_model,
    fit_decode,
    fit_prefill,
    load_gpu_spec,
    load_model_spec,
)

# Round numbers so the expected values below are easy to follow by hand.
GPU = GpuSpec(name="test", bf16_tflops=100, hbm_gbps=1000, memory_gb=80, nvlink_gbps=400, network_gbps=50)
NO_OVERHEAD = dict(step_overhead_s=0.0, layer_overhead_s=0.0, allreduce_latency_s=0.0, transfer_latency_s=0.0)
EFF = Efficiency(mfu_prefill=0.5, mfu_decode=0.5, hbm_efficiency=0.5, link_efficiency=1.0, memory_utilization=0.9,
                 **NO_OVERHEAD)


def llama70b() -> ModelSpec:
    return load_model_spec("Llama-3.1-70B")


def test_kv_bytes_per_token_llama_70b_is_320_kib():
    assert llama70b().kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327680 == 320 * 1024
    assert RooflineCostModel("Llama-3.1-70B", "H20").kv_bytes_per_token == 327680


def test_preset_parameter_counts_match_published_sizes():
    assert llama70b().total_params == pytest.approx(70.55e9, rel=0.01)
    assert load_model_spec("Qwen3-32B").total_params == pytest.approx(32.8e9, rel=0.01)
    mixtral = load_model_spec("Mixtral-8x7B")
    assert mixtral.total_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.02)


def test_prefill_by_hand_llama_70b_tp2():
    m = llama70b()
    cm = RooflineCostModel(m, GPU, EFF)
    h, L, nq, nkv, d, inter, V = 8192, 80, 64, 8, 128, 28672, 128256
    per_layer = 2 * h * nq * d + 2 * h * nkv * d + 2 * h + 3 * h * inter
    l_hist, l_incr, tp = 1000, 500, 2
    flops = 2 * L * per_layer * l_incr + 2 * V * h + 4 * L * nq * d * l_incr * (l_hist + l_incr / 2)
    weights_read = (L * per_layer + V * h) * 2
    kv = (l_hist + 2 * l_incr) * 327680
    compute = flops / (tp * 100e12 * 0.5)
    memory = (weights_read + kv) / (tp * 1000e9 * 0.5)
    msg = l_incr * h * 2
    allreduce = 2 * L * (2 * (tp - 1) / tp * msg / (400e9 / 2))
    expected = max(compute, memory) + allreduce
    assert cm.t_pre(l_hist, l_incr, Layout(tp=tp)) == pytest.approx(expected, rel=1e-9)
    assert compute > memory  # prefill of 500 tokens is compute-bound


def test_decode_step_by_hand_llama_70b_tp4():
    cm = RooflineCostModel(llama70b(), GPU, EFF)
    h, L, nq, nkv, d, inter, V = 8192, 80, 64, 8, 128, 28672, 128256
    per_layer = 2 * h * nq * d + 2 * h * nkv * d + 2 * h + 3 * h * inter
    batch, ctx, tp = 8, 8 * 2000, 4
    flops = 2 * (L * per_layer + V * h) * batch + 4 * L * nq * d * ctx
    bytes_ = (L * per_layer + V * h) * 2 + (ctx + batch) * 327680
    compute = flops / (tp * 100e12 * 0.5)
    memory = bytes_ / (tp * 1000e9 * 0.5)
    allreduce = 2 * L * (2 * 3 / 4 * batch * h * 2 / 200e9)
    assert memory > compute  # small-batch decode is memory-bound
    assert cm.t_dec(batch, ctx, Layout(tp=tp)) == pytest.approx(memory + allreduce, rel=1e-9)
    assert cm.t_dec(0, 0, Layout(tp=tp)) == 0.0


def test_overheads_are_added():
    base = RooflineCostModel(llama70b(), GPU, EFF)
    with_overhead = RooflineCostModel(llama70b(), GPU, EFF, step_overhead_s=1e-3, layer_overhead_s=1e-5,
                                      allreduce_latency_s=2e-5)
    extra = 1e-3 + 80 * 1e-5 + 2 * 80 * 2e-5
    assert with_overhead.t_dec(4, 4000, Layout(tp=2)) == pytest.approx(base.t_dec(4, 4000, Layout(tp=2)) + extra)


def test_history_makes_prefill_slower_and_decode_grows_with_context():
    cm = RooflineCostModel("Llama-3.1-70B", "H20")
    layout = Layout(tp=4)
    assert cm.t_pre(8000, 500, layout) > cm.t_pre(0, 500, layout)
    assert cm.t_pre(0, 4000, layout) > cm.t_pre(0, 500, layout)
    assert cm.t_dec(32, 32 * 8000, layout) > cm.t_dec(32, 32 * 1000, layout)
    # Zero new tokens still computes one (engines always run the last position).
    assert cm.t_pre(100, 0, layout) == cm.t_pre(100, 1, layout)
    with pytest.raises(ValueError):
        cm.t_pre(-1, 10, layout)


def test_tp_scaling_speeds_up_compute_with_diminishing_returns():
    cm = RooflineCostModel("Llama-3.1-70B", "H20")
    t = {tp: cm.t_pre(0, 2000, Layout(tp=tp)) for tp in (2, 4, 8)}
    assert t[2] > t[4] > t[8]
    assert t[2] / t[4] < 2.0  # all-reduce and fixed overheads do not shrink
    assert t[2] / t[4] > 1.7
    # TP=1 has no collective at all.
    assert cm.comm_time(1000, Layout(tp=1)) == 0.0
    assert cm.comm_time(1000, Layout(tp=8)) > cm.comm_time(1000, Layout(tp=2))


def test_pipeline_parallel_adds_capacity_not_speed():
    cm = RooflineCostModel("Llama-3.1-70B", "H20")
    assert cm.kv_capacity_tokens(Layout(tp=2, pp=2)) > cm.kv_capacity_tokens(Layout(tp=2))
    assert cm.t_pre(0, 1000, Layout(tp=2, pp=2)) > cm.t_pre(0, 1000, Layout(tp=2))


def test_moe_uses_active_params_for_flops_and_total_for_memory():
    mixtral = load_model_spec("Mixtral-8x7B")
    cm = RooflineCostModel(mixtral, GPU, EFF)
    h, L, inter, V, E = 4096, 32, 14336, 32000, 8
    attn = 2 * h * 32 * 128 + 2 * h * 8 * 128
    dense_layer = attn + 2 * h + h * E
    expert = 3 * h * inter
    assert mixtral.active_params == L * (dense_layer + 2 * expert) + V * h
    assert mixtral.total_params == L * (dense_layer + E * expert) + 2 * V * h + h
    # FLOPs follow the active parameters: 2 of 8 experts.
    assert cm.decode_flops(1, 0) == 2 * mixtral.active_params
    # One token touches 2 experts; a large batch touches all 8.
    dense_bytes = (L * dense_layer + V * h) * 2
    assert mixtral.weight_bytes_read(1) == pytest.approx(dense_bytes + L * 2 * expert * 2)
    assert mixtral.weight_bytes_read(4096) == pytest.approx(dense_bytes + L * E * expert * 2)
    # Capacity subtracts the total weights.
    expected = int((80e9 * 0.9 * 2 - mixtral.total_params * 2) // mixtral.kv_bytes_per_token)
    assert cm.kv_capacity_tokens(Layout(tp=2)) == expected
    assert cm.kv_capacity_tokens(Layout(tp=1)) == 0  # 93 GB of weights: all experts stay resident


def test_kv_capacity_by_hand_and_weights_that_do_not_fit():
    cm = RooflineCostModel("Llama-3.1-70B", "H20")
    weights = llama70b().total_params * 2
    assert cm.kv_capacity_tokens(Layout(tp=1)) == 0  # 141 GB of weights > 0.9·96 GB
    assert not cm.fits(Layout(tp=1))
    assert cm.kv_capacity_tokens(Layout(tp=4)) == int((96e9 * 0.9 * 4 - weights) // 327680)
    # tp beyond the 8 KV heads replicates KV: 16 GPUs hold each head twice.
    assert cm.kv_replication(Layout(tp=16)) == 2.0
    assert cm.kv_capacity_tokens(Layout(tp=16)) == int((96e9 * 0.9 * 16 - weights) // (327680 * 2))


def test_kv_transfer_time_by_hand():
    cm = RooflineCostModel(llama70b(), GPU, EFF, transfer_latency_s=1e-4)
    one, two = Layout(tp=1), Layout(tp=2)
    assert cm.t_kv(1000, one, one) == pytest.approx(1e-4 + 1000 * 327680 / 50e9)
    assert cm.t_kv(1000, two, two) == pytest.approx(1e-4 + 1000 * 327680 / 100e9)  # one NIC per GPU
    assert cm.t_kv(1000, one, two, link="nvlink") == pytest.approx(1e-4 + 1000 * 327680 / 200e9)
    assert cm.t_kv(1000, one, two, link="local") == 0.0
    assert cm.t_kv(0, one, two) == 0.0
    with pytest.raises(ValueError, match="unknown link"):
        cm.t_kv(10, one, one, link="pcie")


def test_unknown_presets_list_the_known_ones():
    with pytest.raises(ValueError) as exc:
        load_model_spec("Llama-9000")
    for name in ("Llama-3.1-70B", "Qwen3-32B", "Mixtral-8x7B"):
        assert name in str(exc.value)
    with pytest.raises(ValueError) as exc:
        load_gpu_spec("B300")
    for name in ("H20", "H100", "H200", "A100-80G", "L40S"):
        assert name in str(exc.value)


def test_presets_are_case_insensitive_and_hf_ids_work():
    assert load_model_spec("llama-3.1-70b").name == "Llama-3.1-70B"
    assert load_model_spec("Qwen/Qwen3-32B").name == "Qwen3-32B"
    assert load_gpu_spec("h100").name == "H100"


def test_model_from_config_json(tmp_path):
    config = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 256, "vocab_size": 1000, "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(tmp_path)
    assert spec.head_dim == 32 and spec.dtype_bytes == 4
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert load_model_spec(tmp_path / "config.json") == spec
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 1}))
    with pytest.raises(ValueError, match="lacks required field"):
        load_model_spec(tmp_path / "bad.json")


def _fitted() -> FittedCostModel:
    layout = Layout(tp=2)
    return FittedCostModel(
        kv_bytes_per_token=1024,
        layouts={layout: LayoutCoefficients(layout, PrefillCoefficients(0.01, 1e-4, 1e-8),
                                            DecodeCoefficients(0.005, 1e-4, 1e-7), 50_000)},
        links={"net": LinkCoefficients(1e-3, 1e9), "nvlink": LinkCoefficients(1e-5, 1e11)},
        model="tiny", gpu="cpu", meta={"engine": "vllm"},
    )


def test_fitted_model_formulas():
    cm = _fitted()
    layout = Layout(tp=2)
    assert cm.t_pre(1000, 200, layout) == pytest.approx(0.01 + 1e-4 * 200 + 1e-8 * 200 * (1000 + 100))
    assert cm.t_dec(4, 4000, layout) == pytest.approx(0.005 + 4e-4 + 4e-4)
    # The link coefficients are one rank's: two ranks each read half of the KV in parallel.
    assert cm.t_kv(1000, layout, layout) == pytest.approx(1e-3 + 1000 * 1024 / 2 / 1e9)
    assert cm.t_kv(1000, layout, layout, "nvlink") == pytest.approx(1e-5 + 1000 * 1024 / 2 / 1e11)
    assert cm.t_kv(1000, Layout(1), Layout(1)) == pytest.approx(1e-3 + 1000 * 1024 / 1e9)
    assert cm.kv_capacity_tokens(layout) == 50_000
    with pytest.raises(ValueError, match="profiled: tp=2,pp=1"):
        cm.t_pre(0, 10, Layout(tp=8))


def test_fitted_yaml_round_trip(tmp_path):
    cm = _fitted()
    path = tmp_path / "profile.yaml"
    cm.to_yaml(path)
    loaded = FittedCostModel.from_yaml(path)
    assert loaded.to_dict() == cm.to_dict()
    assert loaded.to_dict()["version"] == 1
    layout = Layout(tp=2)
    assert loaded.t_pre(500, 300, layout) == cm.t_pre(500, 300, layout)


def test_fitted_yaml_errors(tmp_path):
    data = _fitted().to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="unsupported profile version"):
        FittedCostModel.from_dict(data)
    data = _fitted().to_dict()
    del data["layouts"][0]["decode"]["b"]
    with pytest.raises(ValueError, match="missing coefficient 'b'"):
        FittedCostModel.from_dict(data)
    with pytest.raises(ValueError, match="cannot read"):
        FittedCostModel.from_yaml(tmp_path / "absent.yaml")


def test_build_cost_model_profile_falls_back_to_roofline(tmp_path):
    path = tmp_path / "p.yaml"
    _fitted().to_yaml(path)
    cm = build_cost_model("Llama-3.1-70B", "H20", profile=path)
    assert isinstance(cm, FittedCostModel)
    roofline = RooflineCostModel("Llama-3.1-70B", "H20")
    assert cm.t_pre(0, 100, Layout(tp=8)) == roofline.t_pre(0, 100, Layout(tp=8))
    assert isinstance(build_cost_model("Qwen3-32B"), RooflineCostModel)  # GPU defaults to H20
    with pytest.raises(ValueError):
        build_cost_model()


def test_fit_recovers_coefficients():
    true_pre = PrefillCoefficients(0.02, 2e-4, 3e-8)
    samples = [(h, n, true_pre(h, n)) for h in (0, 1000, 4000) for n in (64, 512, 2048)]
    fitted = fit_prefill(samples)
    assert fitted.a == pytest.approx(0.02, rel=1e-6) and fitted.c == pytest.approx(3e-8, rel=1e-6)
    true_dec = DecodeCoefficients(0.01, 1e-4, 2e-7)
    fitted_dec = fit_decode([(b, c, true_dec(b, c)) for b in (1, 8, 32) for c in (1000, 20000)])
    assert fitted_dec.b == pytest.approx(1e-4, rel=1e-6)
