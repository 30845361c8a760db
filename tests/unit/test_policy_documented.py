"""The documented baselines: Dynamo's conditional disaggregation and llm-d's prefix-based P/D decider."""

from __future__ import annotations

import pytest

from ampd_plugin.router_policy.registry import load_policy
from ampd_plugin.router_policy.state import PrefillTask, SessionInfo

from policy_fakes import FakeCost, cluster


def task(l_hist=1000, l_incr=500, sid="s", d="d0"):
    return PrefillTask(sid, 1, l_hist, l_incr, 0.0, decode_worker=d)


# ------------------------------------------------------------------------------------------ dynamo
@pytest.mark.parametrize("l_hist,l_incr,block,kind", [
    (896, 104, 64, "local"),      # Dynamo's own example: 1000 prompt, 14 blocks cached → eff 104, ratio 0.104
    (0, 200, 64, "remote"),       # nothing cached: ratio 1.0 ≥ 0.7
    (64_000, 36_000, 64, "remote"),  # mostly cached but eff_isl 36k ≥ 2048
    (10_000, 2048, 1, "remote"),  # eff_isl == threshold: strict <, so remote
    (10_000, 2047, 1, "local"),
    (300, 700, 1, "remote"),      # ratio exactly 0.7: strict <, so remote
    (301, 699, 1, "local"),
    (127, 200, 128, "remote"),    # history shorter than one block: no overlap at all
])
def test_dynamo_isl_bounding(l_hist, l_incr, block, kind):
    c = cluster(1, 1)
    policy = load_policy("dynamo", FakeCost(), block_size=block)
    assert policy.route_prefill(task(l_hist, l_incr), c).kind == kind


def test_dynamo_block_rounding_counts_the_partial_block_as_new():
    c = cluster(1, 1)
    # 1000 prompt, 250 history: with 128-token blocks only 128 are reused → eff 872, ratio 0.872
    assert load_policy("dynamo", FakeCost(), block_size=128).route_prefill(task(250, 750), c).kind == "remote"
    assert load_policy("dynamo", FakeCost(), block_size=1, eff_isl_ratio_threshold=0.8).route_prefill(
        task(250, 750), c).kind == "local"


def test_dynamo_decode_busy_vetoes_local():
    c = cluster(1, 1, capacity=10_000)
    c.decode["d0"].kv_used_tokens = 8_850
    policy = load_policy("dynamo", FakeCost(), block_size=1)
    assert policy.route_prefill(task(5000, 100), c).kind == "local"  # 8950 ≤ 0.9 × 10000
    route = load_policy("dynamo", FakeCost(), block_size=1).route_prefill(task(5000, 200), c)
    assert (route.kind, route.reason) == ("remote", "decode-busy")  # 9050 > 9000
    off = load_policy("dynamo", FakeCost(), block_size=1, decode_busy_threshold=0)
    assert off.route_prefill(task(5000, 200), c).kind == "local"


def test_dynamo_isl_or_load_bypasses_a_busy_prefill_worker():
    c = cluster(1, 1)
    c.prefill["p0"].queue = [task(0, 3000, sid="a"), task(0, 2000, sid="b")]
    isl = load_policy("dynamo", FakeCost())
    assert isl.route_prefill(task(0, 3000), c).kind == "remote"  # cold prompt: IslBounding says remote
    load = load_policy("dynamo", FakeCost(), policy="isl_or_load", prefill_busy_tokens=4096)
    route = load.route_prefill(task(0, 3000), c)
    assert (route.kind, route.reason) == ("local", "prefill-busy")
    calm = load_policy("dynamo", FakeCost(), policy="isl_or_load", prefill_busy_tokens=6000)
    assert calm.route_prefill(task(0, 3000), c).kind == "remote"


def test_dynamo_prefers_the_prefill_worker_caching_the_session():
    c = cluster(2, 1)
    c.prefill["p1"].cached_prefix["s"] = 4000
    c.prefill["p1"].queue = [task(0, 500, sid="x")]
    route = load_policy("dynamo", FakeCost()).route_prefill(task(0, 5000), c)
    assert route.worker == "p1"  # 1000 to compute + 500 queued beats 5000 on the idle p0


def test_dynamo_without_prefill_workers_runs_locally():
    c = cluster(1, 1)
    c.prefill["p0"].alive = False
    route = load_policy("dynamo", FakeCost()).route_prefill(task(0, 9000), c)
    assert (route.kind, route.reason) == ("local", "no-live-prefill-worker")


def test_dynamo_keeps_session_affinity():
    c = cluster(1, 2)
    policy = load_policy("dynamo", FakeCost())
    first = policy.bind_session(SessionInfo("s"), c)
    route = policy.route_prefill(PrefillTask("s", 1, 5000, 100, 0.0), c)
    assert route == type(route)("local", first, "eff-isl-short")


@pytest.mark.parametrize("bad", [{"policy": "magic"}, {"eff_isl_ratio_threshold": 0}, {"block_size": 0},
                                 {"eff_isl_threshold": -1}, {"decode_busy_threshold": -0.1}])
def test_dynamo_rejects_bad_parameters(bad):
    with pytest.raises(ValueError, match="dynamo"):
        load_policy("dynamo", FakeCost(), **bad)


# -------------------------------------------------------------------------------------------- llmd
@pytest.mark.parametrize("l_hist,l_incr,kind", [
    (1000, 127, "local"), (1000, 128, "remote"), (0, 100, "local"), (0, 128, "remote"), (50_000, 5000, "remote"),
])
def test_llmd_non_cached_suffix_decides(l_hist, l_incr, kind):
    c = cluster(1, 1)
    assert load_policy("llmd", FakeCost(), block_size=1).route_prefill(task(l_hist, l_incr), c).kind == kind


def test_llmd_counts_the_partial_block_as_non_cached():
    c = cluster(1, 1)
    # history 1000 with 128-token blocks: 896 reused, so 104 + 100 = 204 non-cached ≥ 128
    assert load_policy("llmd", FakeCost(), block_size=128).route_prefill(task(1000, 100), c).kind == "remote"
    assert load_policy("llmd", FakeCost(), block_size=8).route_prefill(task(1000, 100), c).kind == "local"


def test_llmd_zero_threshold_never_disaggregates():
    c = cluster(1, 1)
    policy = load_policy("llmd", FakeCost(), non_cached_tokens=0)
    assert {policy.route_prefill(task(0, n), c).kind for n in (1, 10_000)} == {"local"}


def test_llmd_remote_picks_cache_then_load():
    c = cluster(2, 1)
    c.prefill["p0"].queue = [task(0, 3000, sid="x")]
    assert load_policy("llmd", FakeCost()).route_prefill(task(0, 1000), c).worker == "p1"
    c.prefill["p0"].cached_prefix["s"] = 1000
    c.prefill["p1"].queue = [task(0, 4000, sid="y")]
    assert load_policy("llmd", FakeCost()).route_prefill(task(0, 1000), c).worker == "p0"


def test_llmd_rejects_bad_parameters():
    with pytest.raises(ValueError, match="non_cached_tokens"):
        load_policy("llmd", FakeCost(), non_cached_tokens=-1)


@pytest.mark.parametrize("name", ["dynamo", "llmd"])
def test_documented_policies_run_in_the_simulator(name):
    from ampd_plugin.planner.simulate import Deployment, simulate
    from ampd_plugin.workload import generate

    sessions = generate("toolbench", 40, rate=2.0, seed=1)
    result = simulate(Deployment.parse("1", "1"), sessions, name, FakeCost(hist_per_token=0.0), ttft_slo=2.0, itl_slo=0.1)
    assert len(result.records) == sum(len(s.rounds) for s in sessions)
    routes = {r.route for r in result.records}
    assert routes == {"local", "remote"}  # first rounds go remote (nothing cached), short later rounds local
