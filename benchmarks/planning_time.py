"""Planning time at paper scale: 256 GPUs, TP degrees {1,2,4,8} (the AMPD paper: about a minute with SCIP).

Times the whole ILP stage of `ampd-plugin plan` (latency tables + top-3 solves with HiGHS + placement) for
each model preset and workload, and in the same run a baseline: exhaustive enumeration of every
homogeneous allocation scored by the same objective (which also checks the ILP's optimum at this scale).
A second ILP run allows several degrees per pool (`--mixed-degrees`), a space brute force cannot cover.
Goal: ILP stage ≤ 5 s. Usage: python benchmarks/planning_time.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

from ampd_plugin.costmodel import build_cost_model
from ampd_plugin.planner.latency_tables import WorkloadStats
from ampd_plugin.planner.search import Candidate, PlanRequest, build_tables, evaluate, score, search
from ampd_plugin.workload import load_workload

CASES = [  # model, gpu, workload, session rate, TTFT SLO, ITL SLO
    ("Llama-3.1-70B", "H20", "toolbench", 16.0, 2.0, 0.1),
    ("Llama-3.1-70B", "H20", "gaia", 0.5, 10.0, 0.1),
    ("Qwen3-32B", "H20", "hotpotqa", 16.0, 2.0, 0.1),
    ("Mixtral-8x7B", "H20", "dureader", 16.0, 3.0, 0.1),
]


def brute_force(req: PlanRequest, tables) -> tuple[float, str, float]:
    """Best score over every homogeneous allocation within the budget; (score, label, seconds)."""
    t0 = time.perf_counter()
    degs = tables[0].degrees
    best = (math.inf, "")
    for n_p in degs:
        for n_d in degs:
            for x in range(1, req.gpus // n_p + 1):
                for y in range(1, (req.gpus - x * n_p) // n_d + 1):
                    cand = Candidate({n_p: x}, {n_d: y}, math.inf)
                    worst, detail = evaluate(req, tables, cand)
                    if math.isfinite(worst):
                        s = score(req, cand, detail, worst)
                        if s < best[0]:
                            best = (s, cand.label())
    return best[0], best[1], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="skip the brute-force baseline")
    args = ap.parse_args()
    print(f"{'model':<14} {'workload':<10} {'rate':>5} {'ILP stage s':>11} {'best (ILP)':<28} {'Z':>6} "
          f"{'brute s':>8} {'same optimum':>12} {'mixed s':>8} {'best (mixed degrees)':<30} {'Z':>6}")
    worst_time = 0.0
    for model, gpu, wl, rate, ttft, itl in CASES:
        stats = WorkloadStats.from_sessions(load_workload(wl, 400, rate, 0), wl)
        req = PlanRequest(build_cost_model(model, gpu), stats, rate, ttft, itl, args.gpus, (1, 2, 4, 8), 8,
                          "ampd", top_k=3)
        t0 = time.perf_counter()
        result = search(req)
        elapsed = time.perf_counter() - t0
        worst_time = max(worst_time, elapsed)
        best = result.candidates[0]
        t1 = time.perf_counter()
        mixed = search(PlanRequest(req.cost_model, stats, rate, ttft, itl, args.gpus, (1, 2, 4, 8), 8, "ampd",
                                   top_k=3, homogeneous=False))
        mixed_s = time.perf_counter() - t1
        worst_time = max(worst_time, mixed_s)
        if args.quick:
            brute_s, same = float("nan"), "-"
        else:
            tables = build_tables(req)
            tables_ilp_score = evaluate(req, tables, best)
            b_score, _b_label, brute_s = brute_force(req, tables)
            same = "yes" if abs(score(req, best, tables_ilp_score[1], tables_ilp_score[0]) - b_score) < 1e-6 else "NO"
        print(f"{model:<14} {wl:<10} {rate:>5g} {elapsed:>11.2f} {best.label():<28} {best.objective:>6.2f} "
              f"{brute_s:>8.2f} {same:>12} {mixed_s:>8.2f} {mixed.candidates[0].label():<30} "
              f"{mixed.candidates[0].objective:>6.2f}")
    print(f"\nslowest ILP stage: {worst_time:.2f} s for {args.gpus} GPUs (goal ≤ 5 s; paper: ~60 s with SCIP)")


if __name__ == "__main__":
    main()
