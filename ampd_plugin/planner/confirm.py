"""Confirm ILP candidates by simulating each as a whole deployment under the routing policy.

The ILP ranks allocations with per-replica surrogates; this runs core's discrete-event simulator
(`planner.simulate`) on the same workload at several session rates, with KV transfers priced by the
candidate's placement, and returns `slo.summarize` dicts from which `search` takes attainment and goodput.
"""

from __future__ import annotations

from typing import Callable

from ampd_plugin.costmodel import Layout, LinkPricing
from ampd_plugin.planner.search import Candidate, PlanRequest


def make_simulator(req: PlanRequest, workload: str, sessions: int, seed: int = 0,
                   link_gbps: float | None = None, net_gbps: float | None = None,
                   policy_params: dict | None = None) -> Callable[[Candidate, float], dict]:
    """A `search.Simulator`: (candidate, session rate) -> summary of the simulated deployment."""
    from ampd_plugin.planner.simulate import Deployment, Pool, simulate
    from ampd_plugin.workload import load_workload

    def run(cand: Candidate, rate: float) -> dict:
        pools = []
        for counts in (cand.prefill, cand.decode):
            active = [(n, k) for n, k in counts.items() if k > 0]
            if len(active) > 1:
                raise ValueError(f"{cand.label()}: the simulator runs one degree per pool")
            n, k = active[0] if active else (1, 0)
            pools.append(Pool(k, Layout(tp=n, backend=req.engine)))
        intra = cand.placement.intra_node_fraction if cand.placement else None
        cm = LinkPricing(req.cost_model, intra_node_fraction=intra, link_gbps=link_gbps, net_gbps=net_gbps)
        # As emitted: a deployment without a prefill pool runs its router with no KV connector.
        connector = "ampd" if pools[0].count else "none"
        result = simulate(Deployment(pools[0], pools[1]), load_workload(workload, sessions, rate, seed),
                          req.policy, cm, ttft_slo=req.ttft_slo, itl_slo=req.itl_slo, seed=seed,
                          policy_params=policy_params, kv_connector=connector)
        return result.summary(req.ttft_slo, req.itl_slo)

    return run
