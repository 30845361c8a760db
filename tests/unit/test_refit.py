"""Online recalibration of a fitted cost model from (predicted, measured) observations."""

from __future__ import annotations

import numpy as np
import pytest

from ampd_plugin.costmodel import (DecodeCoefficients, FittedCostModel, Layout, LayoutCoefficients, LinkCoefficients,
                                   PrefillCoefficients, RooflineCostModel)
from ampd_plugin.refit import Bounds, Observation, refit

L = Layout(1)


def model(pre=(0.005, 3e-6, 4e-9), dec=(0.0012, 1e-4, 1.6e-8), link=(0.0018, 2.5e9)):
    return FittedCostModel(
        kv_bytes_per_token=512,
        layouts={L: LayoutCoefficients(L, PrefillCoefficients(*pre), DecodeCoefficients(*dec), 100_000)},
        links={"net": LinkCoefficients(*link)}, model="tiny", gpu="cpu",
        serving={"token_budget": 2048, "router_s": 0.004}, meta={"fit": {"prefill_mape": 0.05}})


def prefill_obs(truth, n=30, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, i = int(rng.integers(0, 2000)), int(rng.integers(16, 1200))
        y = truth.t_pre(h, i, L) * (1 + noise * rng.standard_normal())
        out.append(Observation("prefill", (h, i), y, L))
    return out


def test_refit_moves_towards_what_was_measured_and_reduces_the_error():
    current, truth = model(), model(pre=(0.008, 4.5e-6, 5e-9))
    obs = prefill_obs(truth)
    res = refit(current, obs, Bounds(low=0.5, high=2.0, min_samples=5))
    (change,) = res.changes
    assert change["term"] == "prefill tp=1,pp=1" and change["samples"] == 30
    assert change["error_after"] < 0.25 * change["error_before"]
    new = res.model.layouts[L].prefill
    assert new.a == pytest.approx(0.008, rel=0.15)
    assert new.b == pytest.approx(4.5e-6, rel=0.25)
    # the input model is untouched (pure), decode and links are unchanged
    assert current.layouts[L].prefill == PrefillCoefficients(0.005, 3e-6, 4e-9)
    assert res.model.layouts[L].decode == current.layouts[L].decode
    assert res.model.links == current.links


def test_coefficients_stay_within_their_bounds():
    truth = model(pre=(0.05, 3e-5, 4e-8))  # 10x slower than the model thinks
    res = refit(model(), prefill_obs(truth), Bounds(low=0.5, high=2.0))
    new = res.model.layouts[L].prefill
    assert new.a <= 2 * 0.005 + 1e-15 and new.b <= 2 * 3e-6 + 1e-18 and new.c <= 2 * 4e-9 + 1e-21
    assert new.a == pytest.approx(2 * 0.005)  # pinned at the bound, not beyond


def test_few_observations_leave_the_model_alone():
    res = refit(model(), prefill_obs(model(pre=(0.008, 4.5e-6, 5e-9)), n=3), Bounds(min_samples=5))
    assert res.changes == [] and "prefill tp=1,pp=1: 3 observation(s) < 5" in res.skipped
    assert res.model.layouts[L].prefill == model().layouts[L].prefill


def test_decode_and_transfer_groups_and_dropped_samples():
    truth = model(dec=(0.002, 1.5e-4, 2e-8), link=(0.003, 1.25e9))
    obs = [Observation("decode", (b, b * c), truth.t_dec(b, b * c, L)) for b in (1, 2, 4, 8) for c in (64, 512, 2048)]
    obs += [Observation("transfer", (t, 0), truth.t_kv(t, L, L)) for t in (64, 256, 1024, 4096, 8192)]
    obs += [Observation("decode", (1, 10), float("nan")), Observation("decode", (1, 10), -1.0)]
    res = refit(model(), obs, Bounds(low=0.25, high=4.0))
    terms = {c["term"]: c for c in res.changes}
    assert set(terms) == {"decode tp=1,pp=1", "transfer net"}
    assert res.model.layouts[L].decode.a == pytest.approx(0.002, rel=0.15)
    # five transfer sizes against the prior: the bandwidth moves most of the way (2.5 → 1.25 GB/s)
    assert 1.1e9 < res.model.links["net"].bandwidth_bytes_per_s < 1.8e9
    assert terms["transfer net"]["error_after"] < 0.3 * terms["transfer net"]["error_before"]
    assert any("2 observation(s)" in s for s in res.skipped)


def test_export_is_a_profile_yaml_with_the_refit_logged(tmp_path):
    res = refit(model(), prefill_obs(model(pre=(0.008, 4.5e-6, 5e-9))))
    path = tmp_path / "refit.yaml"
    res.to_yaml(path)
    loaded = FittedCostModel.from_yaml(path)
    assert loaded.layouts[L].prefill.a == pytest.approx(res.model.layouts[L].prefill.a)
    assert loaded.serving == {"token_budget": 2048, "router_s": 0.004}  # serving terms survive
    assert loaded.meta["fit"] == {"prefill_mape": 0.05}
    (entry,) = loaded.meta["refit"]
    assert entry["changes"][0]["term"] == "prefill tp=1,pp=1"
    # history is bounded
    m = loaded
    for _ in range(12):
        m = refit(m, prefill_obs(model(pre=(0.008, 4.5e-6, 5e-9)))).model
    assert len(m.meta["refit"]) == 10


def test_bad_inputs():
    with pytest.raises(ValueError, match="fitted cost model"):
        refit(RooflineCostModel("Llama-3.1-70B", "H20"), [])
    with pytest.raises(ValueError, match="unknown observation kind"):
        refit(model(), [Observation("sampling", (1, 1), 0.1)])
    with pytest.raises(ValueError, match="bounds"):
        Bounds(low=1.5)
