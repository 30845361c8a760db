"""Online recalibration: live rounds vs the cost model's predictions, a bounded refit, the profile YAML."""

import logging
import random

import pytest
from policy_fakes import FakeCost

from ampd_plugin.costmodel import (DecodeCoefficients, FittedCostModel, Layout, LayoutCoefficients, LinkCoefficients,
                                   PrefillCoefficients)
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.recalibration import OnlineRefit
from ampd_plugin.router.server import Router
from ampd_plugin.router.sessions import PromptCounter, Session
from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, WorkerState

L = Layout()


def model(pre=(0.005, 3e-6, 4e-9), dec=(0.0012, 1e-4, 1.6e-8)):
    return FittedCostModel(kv_bytes_per_token=512,
                           layouts={L: LayoutCoefficients(L, PrefillCoefficients(*pre), DecodeCoefficients(*dec), 100_000)},
                           links={"net": LinkCoefficients(0.0018, 2.5e9)}, model="tiny", gpu="cpu")


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def cluster():
    c = ClusterState()
    c.add_worker(WorkerState("p0", "prefill", L))
    c.add_worker(WorkerState("d0", "decode", L))
    return c


def rounds(truth, n, rng):
    """Successful rounds as the accounting sees them, measured on hardware that behaves like `truth`."""
    for i in range(n):
        h, inc, out = rng.randrange(0, 3000), rng.randrange(16, 1500), rng.randrange(8, 64)
        ctx = RoundCtx(Session(f"s{i}", True), True, {}, True, "", h + inc, 0.0, f"r{i}")
        ctx.task = PrefillTask(f"s{i}", 1, h, inc, 0.0, "d0")
        ctx.decode, ctx.prefilled_on, ctx.queue_wait, ctx.ttft_source = "d0", "p0", 0.01, "stream"
        ttft = truth.t_pre(h, inc, L) + ctx.queue_wait
        tpot = truth.t_dec(1, h + inc + out // 2, L)
        yield ctx, ttft, tpot, out


def test_live_rounds_refit_the_model_within_its_step_bound_and_write_a_profile(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.refit")
    live, truth, clock = model(), model(pre=(0.008, 4.5e-6, 5e-9), dec=(0.002, 1.5e-4, 2e-8)), Clock()
    out = tmp_path / "refit.yaml"
    r = OnlineRefit(live, cluster(), min_samples=40, max_step=0.25, interval_s=30, out_path=str(out), clock=clock)
    shared = live  # what the policy holds
    rng = random.Random(3)
    for obs in rounds(truth, 30, rng):
        r.observe(*obs)
    clock.t = 31
    assert r.maybe_refit() is False  # too few new observations
    for obs in rounds(truth, 30, rng):
        r.observe(*obs)
    before = live.layouts[L].prefill
    assert r.maybe_refit() is True and r.refits == 1
    after = shared.layouts[L].prefill
    # moved towards what was measured, by at most 25 % per coefficient in one step
    assert after.a > before.a and after.a <= 1.25 * before.a + 1e-15 and after.b <= 1.25 * before.b + 1e-18
    assert shared.layouts[L].decode.a > 0.0012
    terms = {c["term"]: c for c in r.last_changes}
    assert terms["prefill tp=1,pp=1"]["error_after"] < terms["prefill tp=1,pp=1"]["error_before"]
    assert any("online refit prefill" in rec.getMessage() for rec in caplog.records)
    written = FittedCostModel.from_yaml(out)
    assert written.layouts[L].prefill == after and written.meta["refit"][-1]["changes"]
    for obs in rounds(truth, 60, rng):
        r.observe(*obs)
    clock.t = 40
    assert r.maybe_refit() is False  # within the interval since the last refit
    clock.t = 62
    assert r.maybe_refit() is True and shared.layouts[L].prefill.a > after.a  # a second bounded step


def test_predicted_ttft_samples_are_not_learned_from_and_the_ring_is_bounded():
    r = OnlineRefit(model(), cluster(), min_samples=5, max_samples=5)
    for ctx, ttft, tpot, out in rounds(model(), 25, random.Random(1)):
        ctx.ttft_source = "predicted"  # the cost model's own figure: learning from it would be circular
        r.observe(ctx, ttft, None, out)
    assert len(r) == 0
    for obs in rounds(model(), 25, random.Random(1)):
        r.observe(*obs)
    assert len(r) == 10  # two observations per round, the last five rounds


def test_refit_is_off_by_default_and_refuses_a_model_it_cannot_refit():
    assert RouterConfig().refit_online is False and RouterConfig().refit_out is None
    cost = FakeCost()
    cfg = RouterConfig(decode=["http://127.0.0.1:9"], model="m")
    router = Router(cfg, load_policy("colocated", cost), cost, counter=PromptCounter(None))
    assert router.refit is None and router.accounting.observers == []
    with pytest.raises(ValueError, match="fitted cost model"):
        Router(cfg.updated({"refit_out": "/tmp/x.yaml"}), load_policy("colocated", cost), cost, counter=PromptCounter(None))
    with pytest.raises(ValueError, match="refit_max_step"):
        cfg.updated({"refit_max_step": 1.5}).validate()
