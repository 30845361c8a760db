#!/usr/bin/env python3
"""AMPD against what users run today, on the real CPU testbed: paired seeds × session rates × policies.

    sudo -E python benchmarks/testbed_eval.py --quick            # 2 seeds × 2 rates, 25 s of load per run
    sudo -E python benchmarks/testbed_eval.py                    # 5 seeds × 3 rates (0.4, 0.6, 0.8/s), 60 s each

Every policy plays the same multi-round workload (the demo's: ToolBench ≤ 6 rounds, demo model, SLO TTFT
2 s / ITL 30 ms) with the same seeds and prompt text on the same two vLLM-CPU engine processes (worker 0
on core 0, worker 1 on core 1), caches reset before each run. One set of engines per connector kind; the
engines restart only between kinds:
- `ampd` connector engines: `ampd`, `ampd*` (= ampd:predictive=true:itl_aware=true, the project's
  improvements), `dynamo` (Dynamo conditional disaggregation), `llmd` (llm-d prefix-based P/D decider) —
  all through `ampd-plugin route` with worker 0 as prefill and worker 1 as decode — and `colocated` (both
  workers as independent replicas behind the router's session affinity, `--kv-connector none`: no KV moves);
- vLLM's in-tree `MooncakeConnector` engines: `vllm-today` — the real `vllm-router` in PD mode, every
  round prefilled on worker 0 (`ampd_plugin.baselines_deploy`).

Statistics: per (rate, seed) the round SLO attainment of each policy; at each rate the best baseline is
the one with the highest mean over seeds; for each of ours the paired differences (ours − best baseline,
same seed) get a 95 % bootstrap interval of their mean (scipy.stats.bootstrap, percentile, 10,000
resamples, fixed seed). Outputs in --out: results.json (every run, with the engines' own counters of what
was computed where and how many KV tokens arrived through a connector), attainment.png (mean ± 95 %
bootstrap band per policy against rate), summary.md.

The machine must be otherwise idle: another process using a core makes the figures meaningless. The
harness measures CPU used by processes outside its own tree before and during the runs
(`ampd_plugin.busy`) and warns loudly — and records it next to every figure. It takes the engine lock.
Needs root (a loopback-only network namespace: Mooncake binds every interface).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ampd_plugin import localcluster as lc  # noqa: E402
from ampd_plugin.busy import BUSY_CORES, BusySampler, foreign_usage  # noqa: E402
from ampd_plugin.evaluation import (  # noqa: E402
    DEMO_ITL_SLO,
    DEMO_MODEL,
    DEMO_SLO_TARGET,
    DEMO_TTFT_SLO,
    DEMO_WORKLOAD,
    MIN_PAIRS,
    VLLM_TODAY,
    Run,
    analyse,
    bootstrap_mean_ci,
    connector_kind,
    reading,
    run_one,
    start_engines,
)

POLICIES = ("ampd", "ampd*", "dynamo", "llmd", "colocated", VLLM_TODAY)  # ampd*, dynamo, llmd: evaluation.POLICY_ALIASES
OURS = ("ampd", "ampd*")
KINDS = ("ampd", "mooncake")
SLO = dict(ttft_slo=DEMO_TTFT_SLO, itl_slo=DEMO_ITL_SLO, slo_target=DEMO_SLO_TARGET)
__all__ = ["bootstrap_mean_ci", "Run"]


def plot(analysis: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for policy, curve in analysis["curves"].items():
        keys = sorted(curve, key=float)  # "0.4", "0.8" …
        rates = [float(k) for k in keys]
        mean = [100 * curve[k][0] for k in keys]
        style = "-" if policy in OURS else "--"
        (line,) = ax.plot(rates, mean, style, marker="o", label=policy)
        lows = [curve[k][1] for k in keys]
        highs = [curve[k][2] for k in keys]
        if all(v is not None for v in lows + highs):
            ax.fill_between(rates, [100 * v for v in lows], [100 * v for v in highs], color=line.get_color(), alpha=0.15)
            ax.errorbar(rates, mean, yerr=[[m - 100 * lo for m, lo in zip(mean, lows)],
                                           [100 * hi - m for m, hi in zip(mean, highs)]],
                        fmt="none", ecolor=line.get_color(), capsize=4, alpha=0.8)
    ax.axhline(100 * DEMO_SLO_TARGET, color="grey", ls=":", lw=1, label=f"target {100 * DEMO_SLO_TARGET:.0f} %")
    ax.set(xlabel="session rate (sessions/s)", ylabel="round SLO attainment (%)", ylim=(0, 105))
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_markdown(runs: list[Run], analysis: dict, meta: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    lines = [f"# testbed_eval {meta['mode']} — {meta['started']}", "",
             f"Seeds {meta['seeds']}, rates {meta['rates']} sessions/s, {meta['duration_s']:g} s of arrivals per run, "
             f"workload {DEMO_WORKLOAD['workload']} ≤ {DEMO_WORKLOAD['max_rounds']} rounds, SLO TTFT "
             f"{DEMO_TTFT_SLO:g} s / ITL {1000 * DEMO_ITL_SLO:g} ms.",
             f"Machine load by other processes: before {meta['foreign_before']:.2f} cores, worst 2-s window during "
             f"the runs {meta['foreign_worst']:.2f} cores (busy above {BUSY_CORES} cores).", "",
             "| policy | rate | seed | attainment | TTFT p95 | ITL p95 | local | KV tokens in | errors | other procs (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.rate, r.seed, POLICIES.index(r.policy) if r.policy in POLICIES else 99)):
        ms = lambda v: "–" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
        lines.append(f"| {r.policy} | {r.rate:g} | {r.seed} | {pct(r.attainment)} | {ms(r.ttft_p95)} | {ms(r.itl_p95)} | "
                     f"{pct(r.local_fraction)} | {r.kv_tokens_received or 0:.0f} | {r.errors} | "
                     f"{'–' if r.foreign_cores_max is None else f'{r.foreign_cores_max:.2f}'}"
                     + (f" ({r.failure})" if r.failure else "") + " |")
    lines += ["", "| rate | policy | mean attainment | 95 % bootstrap CI |", "|---|---|---|---|"]
    for policy, curve in analysis["curves"].items():
        for rate, (mean, lo, hi) in curve.items():
            ci = "–" if lo is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"
            lines.append(f"| {rate} | {policy} | {100 * mean:.1f} % | {ci} |")
    lines += ["", "| rate | ours − best baseline | n | mean diff (points) | 95 % CI | reading |", "|---|---|---|---|---|---|"]
    for p in analysis["paired"]:
        ci = "–" if p["ci_low"] is None else f"[{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}]"
        verdict = ("significant" if p["significant"] else "not significant") if p["n"] >= MIN_PAIRS else \
            f"too few pairs (< {MIN_PAIRS}): no verdict"
        lines.append(f"| {p['rate']:g} | {p['ours']} − {p['best_baseline']} | {p['n']} | {100 * p['mean_diff']:+.1f} | "
                     f"{ci} | {verdict} |")
    lines += [""] + [f"- {reading(p)}" for p in analysis["paired"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main
def loud(msg: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\n!! {msg}\n{bar}\n", file=sys.stderr, flush=True)


def evaluate(args) -> int:
    from ampd_plugin.tiny_model import TinyModelSpec, build_tiny_model

    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    rates = [float(x) for x in args.rates.split(",")]
    seeds = list(range(args.seed, args.seed + args.seeds))
    meta = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seeds": seeds, "rates": rates, "duration_s": args.duration, "policies": policies,
            "model": DEMO_MODEL, "workload": DEMO_WORKLOAD, "slo": {"ttft_s": DEMO_TTFT_SLO, "itl_s": DEMO_ITL_SLO},
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    runs: list[Run] = []
    with lc.engine_lock(on_wait=lambda: print("waiting for the engine lock (another benchmark or test holds it) …",
                                              file=sys.stderr, flush=True)):
        before = foreign_usage(3.0)
        meta["foreign_before"] = before.foreign_cores
        if before.busy:
            loud(f"THE MACHINE IS BUSY: {before.describe()}. Results measured now mean little.")
            if args.refuse_busy:
                return 3
        model = build_tiny_model(TinyModelSpec(**DEMO_MODEL))
        with BusySampler(period_s=8.0, window_s=2.0) as sampler:
            for kind in KINDS:
                mine = [p for p in policies if connector_kind(p) == kind]
                if not mine:
                    continue
                print(f"starting {kind} engines …", flush=True)
                workers, dep = start_engines(kind, model, out / "logs" / kind)
                try:
                    for i, seed in enumerate(seeds):
                        for rate in rates:
                            k = (i + rates.index(rate)) % len(mine)  # rotate the order: no policy always first
                            for policy in mine[k:] + mine[:k]:
                                sessions = max(2, round(rate * args.duration))
                                run = run_one(policy, workers, dep, model, rate, seed, sessions, out / "runs", SLO,
                                              samples=sampler.samples)
                                runs.append(run)
                                busy = run.foreign_cores_max is not None and run.foreign_cores_max > BUSY_CORES
                                print(f"{policy:>10} rate {rate:g} seed {seed}: attainment "
                                      f"{'–' if run.attainment is None else f'{100 * run.attainment:.1f} %'}"
                                      f" ({run.rounds} rounds, {run.errors} errors) {run.failure}"
                                      + (f"  [BUSY: {run.foreign_cores_max:.2f} foreign cores]" if busy else ""),
                                      flush=True)
                                (out / "results.json").write_text(json.dumps(
                                    {"meta": meta, "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
                finally:
                    if dep is not None:
                        dep.stop()
                    else:
                        lc.stop_all(workers)
        meta["foreign_worst"] = sampler.worst.foreign_cores if sampler.worst else 0.0
        meta["foreign_worst_who"] = sampler.worst.describe() if sampler.worst else ""
    meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return report(runs, meta, out)


def report(runs: list[Run], meta: dict, out: Path) -> int:
    """Analyse, plot and summarise `runs` into `out` (also used by --report-only on a saved results.json)."""
    analysis = analyse(runs, OURS)
    worst = meta.get("foreign_worst", 0.0)
    busy_note = f" — MACHINE BUSY (≤ {worst:.1f} foreign cores)" if worst > BUSY_CORES else ""
    plot(analysis, out / "attainment.png",
         f"testbed: attainment vs rate, mean ± 95 % bootstrap ({len(meta['seeds'])} seeds){busy_note}")
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in runs],
                                                  "analysis": analysis}, indent=1) + "\n")
    md = summary_markdown(runs, analysis, meta)
    (out / "summary.md").write_text(md)
    print(md)
    if worst > BUSY_CORES:
        loud(f"THE MACHINE WAS BUSY DURING THE RUNS: {meta.get('foreign_worst_who', '')}. Treat these figures as noise.")
    return 0 if runs and all(not r.failure for r in runs) else 1


def report_only(path: Path) -> int:
    """Re-analyse a results.json (a finished run, or the partial one an interrupted run leaves)."""
    data = json.loads(path.read_text())
    runs = [Run(**r) for r in data["runs"]]
    meta = data["meta"]
    if "foreign_worst" not in meta:  # interrupted: take the worst window the runs recorded
        meta["foreign_worst"] = max((r.foreign_cores_max or 0.0 for r in runs), default=0.0)
        meta["partial"] = True
    return report(runs, meta, path.parent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds × rates 0.4,0.8 × 25 s (a smoke run, not evidence)")
    ap.add_argument("--seeds", type=int, default=None, help="paired seeds (default 5; quick 2)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--rates", default=None, help="session rates, comma-separated (default 0.4,0.6,0.8; quick 0.4,0.8)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of session arrivals per run (default 60; quick 25)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"subset of {', '.join(POLICIES)}")
    ap.add_argument("--out", default="testbed-eval-out")
    ap.add_argument("--refuse-busy", action="store_true", help="exit 3 instead of running when the machine is busy")
    ap.add_argument("--report-only", metavar="RESULTS_JSON", help="only re-analyse a saved results.json (no engines)")
    args = ap.parse_args(argv)
    if args.report_only:
        return report_only(Path(args.report_only))
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.rates = args.rates or ("0.4,0.8" if args.quick else "0.4,0.6,0.8")
    args.duration = args.duration or (25.0 if args.quick else 60.0)
    if not lc.in_isolated_netns():
        if os.geteuid() != 0:
            raise SystemExit("testbed_eval starts Mooncake transfer engines, which listen on every interface; it runs "
                             "itself in a fresh loopback-only network namespace, which needs root")
        ns = f"ampd-eval-{os.getpid()}"
        signal.signal(signal.SIGINT, lambda *_: None)  # the child cleans up on Ctrl-C
        try:
            return lc.reexec_in_netns(ns, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
        finally:
            lc.delete_netns(ns)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
