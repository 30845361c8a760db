"""Simulator speed: 10,000 ToolBench sessions on one core (events/s and wall time).

Prints one line per policy on the same workload and deployment (Llama-3.1-70B on 8 H20, P 1x4 + D 1x4;
colocated on D 2x4), so the figures compare the event loop under different routing patterns.
Usage: python benchmarks/simulator_speed.py [--sessions N] [--rate R]
"""

from __future__ import annotations

import argparse
import time

from ampd_plugin.costmodel import build_cost_model
from ampd_plugin.planner.simulate import Deployment, simulate
from ampd_plugin.workload import load_workload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=0.8, help="sessions/s (0.8 is near the 8-GPU knee)")
    args = ap.parse_args()
    cost = build_cost_model("Llama-3.1-70B", "H20")
    t0 = time.perf_counter()
    sessions = load_workload("toolbench", sessions=args.sessions, rate=args.rate, seed=0)
    gen_s = time.perf_counter() - t0
    rounds = sum(len(s.rounds) for s in sessions)
    print(f"workload: {args.sessions} ToolBench sessions, {rounds} rounds, rate {args.rate}/s "
          f"(generated in {gen_s:.2f} s)")
    print(f"{'policy':10} {'deployment':18} {'events':>9} {'wall s':>8} {'events/s':>10} {'rounds/s':>9} "
          f"{'sim s':>8} {'attain':>7}")
    for policy, dep in (("ampd", ("1x4", "1x4")), ("disagg", ("1x4", "1x4")),
                        ("threshold", ("1x4", "1x4")), ("colocated", ("0", "2x4"))):
        deployment = Deployment.parse(*dep)
        t0 = time.perf_counter()
        result = simulate(deployment, sessions, policy, cost, ttft_slo=1.5, itl_slo=0.05)
        wall = time.perf_counter() - t0
        att = result.summary(1.5, 0.05)["slo_attainment"]
        print(f"{policy:10} {str(deployment):18} {result.events:9d} {wall:8.2f} {result.events / wall:10.0f} "
              f"{rounds / wall:9.0f} {result.counters['simulated_s']:8.0f} {att:7.3f}")


if __name__ == "__main__":
    main()
