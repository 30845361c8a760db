"""Paper-scale comparison in the simulator: AMPD vs always-disaggregated, co-located, threshold, Dynamo, llm-d.

Setting of the AMPD paper (§7): Llama-3.1-70B on H20 GPUs; ToolBench on 8 GPUs, HotpotQA 8, DuReader 16,
GAIA 32; Poisson session arrivals at a swept rate. Every policy gets its own best allocation of the same
GPUs, found by a simple search over prefill/decode splits and TP degrees (screened at two probe rates
with fewer sessions), then the rate sweep is run with the chosen allocation.

Policies: `ampd` (the paper's Algorithms 1+2), `ampd*` (with this project's improvements: predictive
slack, locality, ITL-aware fallback), `disagg`, `colocated`, `threshold` (local when the increment is
<= 256 tokens), and today's systems' routing rules as policies of ours: `dynamo` (Dynamo's conditional
disaggregation: decode worker when the effective input — prompt minus the decode worker's cached blocks —
is under 2,048 tokens and 70 % of the prompt; prefill worker by prefix overlap against load) and `llm-d`
(llm-d's prefix-based PD decider: prefill worker only when the non-cached suffix is >= 128 tokens). An ablation runs each improvement alone at AMPD*'s allocation.

SLOs are derived per workload by one rule (see `slos`), not tuned per policy. Writes docs/paper_scale.md
(tables + comparison with the paper's gains) and docs/paper_scale.png (attainment vs rate).
Usage: python benchmarks/paper_scale.py [--scale 1.0] [--out docs]   (a few minutes on one core)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ampd_plugin import slo
from ampd_plugin.costmodel import Layout, build_cost_model
from ampd_plugin.planner.simulate import Deployment, Pool, simulate
from ampd_plugin.workload import generate

MODEL, GPU = "Llama-3.1-70B", "H20"
RATE_FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
PROBE_FRACTIONS = (0.65, 1.0)  # high enough to separate allocations with few sessions
KEEP = 3  # allocations kept for the second screening round
ABLATION_POINTS = (2, 4, 5)  # indices into the rate sweep where the ablation runs
STAR = dict(predictive=True, locality=True, itl_aware=True)
POLICIES = {  # label -> (registered policy, parameters)
    "ampd": ("ampd", {}),
    "ampd*": ("ampd", STAR),
    "disagg": ("disagg", {}),
    "colocated": ("colocated", {}),
    "threshold": ("threshold", {}),
    # Today's systems' rules, as policies of ours with their documented defaults (GPU KV blocks of 16):
    "dynamo": ("dynamo", dict(block_size=16)),  # conditional disaggregation (effective ISL < 2048 and < 70 %)
    "llm-d": ("llmd", dict(block_size=16)),  # prefix-based PD decider (non-cached suffix >= 128 tokens)
}
ABLATION = {
    "ampd": {},
    "+predictive": dict(predictive=True),
    "+locality": dict(locality=True),
    "+itl_aware": dict(itl_aware=True),
    "ampd* (all three)": STAR,
}


@dataclass
class Case:
    workload: str
    gpus: int
    tps: tuple[int, ...]
    sessions: int  # per sweep point
    probe_sessions: int  # per screening point
    rate_stretch: float = 1.0  # multiplies RATE_FRACTIONS and PROBE_FRACTIONS


CASES = [
    Case("toolbench", 8, (2, 4, 8), 400, 150),
    Case("hotpotqa", 8, (2, 4, 8), 400, 150),
    Case("dureader", 16, (4, 8), 300, 120),
    # GAIA sessions last minutes, so a finite sample ramps up and drains for a long time: sweep further.
    Case("gaia", 32, (4, 8), 240, 120, rate_stretch=1.3),
]


def slos(cost, workload: str) -> tuple[float, float, dict]:
    """One rule for every workload (no per-policy tuning).

    TTFT SLO = 2x the 90th percentile of a round's prefill time on an idle TP4 replica (so an unloaded
    deployment meets it comfortably and queueing of about one long prefill is tolerated).
    ITL SLO = 2.5x one decode step on TP4 at batch 16 with the workload's mean context (room for batching
    and some prefill interference, as DistServe's chatbot SLOs allow). Both rounded to 2 significant digits.
    """
    tp4 = Layout(4)
    pre, ctx = [], []
    for s in generate(workload, 2000, rate=1.0, seed=123):
        hist = 0
        for r in s.rounds:
            pre.append(cost.t_pre(hist, r.input_tokens, tp4))
            hist += r.input_tokens
            ctx.append(hist)
            hist += r.output_tokens
    p90 = float(np.percentile(pre, 90))
    mean_ctx = float(np.mean(ctx))
    step = cost.t_dec(16, int(16 * mean_ctx), tp4)
    ttft, itl = float(f"{2 * p90:.2g}"), float(f"{2.5 * step:.2g}")
    return ttft, itl, dict(prefill_p90_tp4=p90, mean_context=mean_ctx, decode_step_tp4_b16=step,
                           prefill_mean_tp4=float(np.mean(pre)))


def prefill_bound_rate(cost, workload: str, gpus: int) -> float:
    """Sessions/s at which the GPUs would be busy with prefill alone on TP4 (sizes the rate sweep)."""
    tp4 = Layout(4)
    sessions = generate(workload, 2000, rate=1.0, seed=321)
    busy = 0.0
    for s in sessions:
        hist = 0
        for r in s.rounds:
            busy += cost.t_pre(hist, r.input_tokens, tp4) * 4
            hist += r.input_tokens + r.output_tokens
    return gpus / (busy / len(sessions))


def allocations(cost, gpus: int, tps: tuple[int, ...], colocated: bool) -> list[Deployment]:
    """All splits of exactly `gpus` GPUs into one prefill and one decode pool with TP degrees in `tps`."""
    fits = [tp for tp in tps if cost.kv_capacity_tokens(Layout(tp)) > 0]
    if colocated:
        return [Deployment(Pool(0), Pool(gpus // tp, Layout(tp))) for tp in fits if gpus % tp == 0]
    out = []
    for tp_p, tp_d in itertools.product(fits, fits):
        for n_p in range(1, gpus // tp_p):
            rest = gpus - n_p * tp_p
            if rest > 0 and rest % tp_d == 0:
                out.append(Deployment(Pool(n_p, Layout(tp_p)), Pool(rest // tp_d, Layout(tp_d))))
    return out


LOAD: dict = {}  # the host's load averages at the start and the end of the run (a shared machine is noisy)
ROUTER: dict = {"count_inflight": False}  # the router's KV accounting (see --count-inflight, --session-ttl)


def run(cost, dep, workload, rate, n, policy, params, ttft, itl, seed=0) -> dict:
    sessions = generate(workload, n, rate, seed)
    # A deployment without a prefill pool runs its router with no KV connector (as `plan` emits it).
    result = simulate(dep, sessions, policy, cost, ttft_slo=ttft, itl_slo=itl, seed=seed, policy_params=params,
                      kv_connector="ampd" if dep.prefill.count else "none", **ROUTER)
    return result.summary(ttft, itl)


def rel_gain(a: list[float], b: list[float]) -> float | None:
    """Mean relative improvement of attainment a over b across the rate points where b > 0."""
    pairs = [(x, y) for x, y in zip(a, b) if y > 0]
    if not pairs:
        return None
    return float(np.mean([x / y - 1 for x, y in pairs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every session count (0.3 = quick look)")
    ap.add_argument("--out", default="docs", help="directory for paper_scale.md/.png/.json")
    ap.add_argument("--only", default=None, help="comma-separated workloads to run")
    ap.add_argument("--count-inflight", action="store_true",
                    help="router KV accounting counts rounds in flight (today's router counts a round when it ends)")
    ap.add_argument("--session-ttl", type=float, default=None,
                    help="seconds the router counts a finished session's KV (today 1800; the connector pins 300)")
    args = ap.parse_args()
    ROUTER["count_inflight"] = args.count_inflight
    if args.session_ttl is not None:
        ROUTER["session_ttl_s"] = args.session_ttl
    cost = build_cost_model(MODEL, GPU)
    started = time.perf_counter()
    LOAD["start"] = os.getloadavg()
    report = {}
    for case in CASES:
        if args.only and case.workload not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        n = max(20, int(case.sessions * args.scale))
        n_probe = max(15, int(case.probe_sessions * args.scale))
        ttft, itl, slo_basis = slos(cost, case.workload)
        cap = prefill_bound_rate(cost, case.workload, case.gpus)
        rates = [float(f"{cap * f * case.rate_stretch:.2g}") for f in RATE_FRACTIONS]
        probes = [cap * f * case.rate_stretch for f in PROBE_FRACTIONS]
        print(f"\n== {case.workload}: {case.gpus} GPUs, SLO TTFT {ttft} s / ITL {itl} s, "
              f"prefill-bound rate {cap:.3f}/s, sweep {rates}", flush=True)

        chosen, screening = {}, {}
        for label, (policy, params) in POLICIES.items():
            # Successive halving: every allocation at the higher probe rate with half the sessions, then
            # the best few at both probe rates with all of them.
            candidates = allocations(cost, case.gpus, case.tps, colocated=(policy == "colocated"))
            first = [(run(cost, dep, case.workload, probes[-1], max(10, n_probe // 2), policy, params, ttft, itl)
                      ["slo_attainment"], i) for i, dep in enumerate(candidates)]
            finalists = [candidates[i] for _, i in sorted(first, key=lambda x: (-x[0], x[1]))[:KEEP]]
            best = None
            for dep in finalists:
                score = float(np.mean([run(cost, dep, case.workload, r, n_probe, policy, params, ttft, itl)
                                       ["slo_attainment"] for r in probes]))
                screening.setdefault(label, []).append((str(dep), score))
                if best is None or score > best[1]:
                    best = (dep, score)
            chosen[label] = best[0]
            print(f"  {label:10} best of {len(candidates)} allocations: {best[0]} "
                  f"(probe attainment {best[1]:.3f})", flush=True)

        sweep = {}
        for label, (policy, params) in POLICIES.items():
            sweep[label] = [run(cost, chosen[label], case.workload, r, n, policy, params, ttft, itl) for r in rates]
            print(f"  {label:10} " + " ".join(f"{s['slo_attainment']:.3f}" for s in sweep[label]), flush=True)

        ablation = {}
        for label, params in ABLATION.items():
            ablation[label] = [run(cost, chosen["ampd*"], case.workload, rates[i], n, "ampd", params, ttft, itl)
                               ["slo_attainment"] for i in ABLATION_POINTS]
            print(f"  ablation {label:18} " + " ".join(f"{a:.3f}" for a in ablation[label]), flush=True)

        report[case.workload] = dict(
            gpus=case.gpus, sessions_per_point=n, probe_sessions=n_probe, ttft_slo=ttft, itl_slo=itl,
            slo_basis=slo_basis, prefill_bound_rate=cap, rates=rates,
            allocations={k: str(v) for k, v in chosen.items()}, screening=screening,
            sweep={k: [{key: s[key] for key in ("slo_attainment", "session_attainment", "ttft_p95", "itl_p95",
                                                 "local_fraction", "kv_bytes_moved", "evictions")} for s in v]
                   for k, v in sweep.items()},
            ablation=ablation, seconds=time.perf_counter() - t0)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - started
    LOAD["end"] = os.getloadavg()
    (out / "paper_scale.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "paper_scale.md", total, args.scale)
    plot(report, out / "paper_scale.png")
    print(f"\nwrote {out / 'paper_scale.md'}, {out / 'paper_scale.png'}, {out / 'paper_scale.json'} in {total:.0f} s")


def att(report_wl: dict, label: str) -> list[float]:
    return [p["slo_attainment"] for p in report_wl["sweep"][label]]


DISCUSSION_MARK = "<!-- discussion: hand-written, kept when the script rewrites this file -->"


def _loads() -> str:
    return " → ".join(f"{LOAD[k][0]:.1f}" for k in ("start", "end") if k in LOAD) + f" on {os.cpu_count()} cores"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.0f} %"


GAIN_PAIRS = [(x, y) for x in ("ampd", "ampd*") for y in ("disagg", "colocated", "threshold", "dynamo", "llm-d")]


def write_markdown(report: dict, path: Path, total_s: float, scale: float) -> None:
    """Tables and computed gains; a hand-written discussion after DISCUSSION_MARK is preserved."""
    kept = ""
    if path.exists() and DISCUSSION_MARK in path.read_text():
        kept = path.read_text().split(DISCUSSION_MARK, 1)[1]
    L = ["# Paper-scale comparison (simulated)", "",
         f"Generated by `python benchmarks/paper_scale.py` (scale {scale}, {total_s:.0f} s on one core; "
         f"host load average {_loads()}). "
         f"Model {MODEL} on {GPU} (roofline cost model), the four workloads at the AMPD paper's scale, Poisson "
         "session arrivals. Each policy runs on its own best allocation of the same GPUs: every split into one "
         "prefill and one decode pool with the TP degrees listed, screened at "
         f"{', '.join(f'{f:.0%}' for f in PROBE_FRACTIONS)} of the prefill-bound rate with fewer sessions. "
         "Attainment = share of rounds meeting both the TTFT and the ITL (TPOT) SLO (`ampd_plugin.slo`). "
         "`ampd` is the paper's policy; `ampd*` adds this project's improvements (predictive slack, locality, "
         "ITL-aware fallback); `dynamo` and `llm-d` are those systems' documented PD rules as policies of ours "
         "(`router_policy/dynamo.py`, `llmd.py`). Rates are fractions "
         f"{', '.join(str(f) for f in RATE_FRACTIONS)} of the rate at which the GPUs would be busy with TP4 "
         "prefill alone (x1.3 for GAIA, whose minutes-long sessions make a finite sample ramp up and drain "
         "slowly). Each point is one seeded run of a finite sample, so attainment includes the ramp-up and the "
         "drain; differences of a few points are within noise.", "", "![attainment vs rate](paper_scale.png)", "",
         "## SLOs (one rule for every workload, fixed before running any policy)", "",
         "TTFT SLO = 2 x the 90th-percentile prefill time of a round on an idle TP4 replica; ITL SLO = 2.5 x one "
         "TP4 decode step at batch 16 with the workload's mean context; both rounded to 2 significant digits. "
         "The paper does not state its thresholds (they are only in its figures), so this rule scales them with "
         "what each workload asks of the hardware: an idle deployment meets them, queueing behind about one "
         "long prefill or moderate batching/prefill interference is tolerated.", "",
         "| workload | GPUs | TTFT SLO | ITL SLO | p90 prefill (TP4, idle) | mean context | sessions/point |",
         "|---|---|---|---|---|---|---|"]
    for name, wl in report.items():
        b = wl["slo_basis"]
        L.append(f"| {name} | {wl['gpus']} | {wl['ttft_slo']} s | {wl['itl_slo'] * 1000:.0f} ms | "
                 f"{b['prefill_p90_tp4']:.2f} s | {b['mean_context']:.0f} tok | {wl['sessions_per_point']} |")
    L += ["", "## SLO attainment vs session rate", ""]
    for name, wl in report.items():
        L += [f"### {name} ({wl['gpus']} GPUs)", "",
              "| policy | allocation | " + " | ".join(f"{r:g}/s" for r in wl["rates"]) + " | goodput (>= 90 %) |",
              "|---|---|" + "---|" * len(wl["rates"]) + "---|"]
        for label in POLICIES:
            a = att(wl, label)
            gp = slo.goodput(list(zip(wl["rates"], a)))
            capped = ">= " if a[-1] >= 0.9 else ""  # still meeting the target at the highest rate swept
            L.append(f"| {label} | {wl['allocations'][label]} | " + " | ".join(f"{x:.2f}" for x in a)
                     + f" | {capped}{gp:g}/s |")
        local = [p["local_fraction"] for p in wl["sweep"]["ampd"]]
        L += ["", f"AMPD local-prefill share across the sweep: {min(local):.0%}-{max(local):.0%} "
                  f"(paper, Fig. 5: 13.9-31.7 %).", ""]
    L += ["## Gains next to the paper's", "",
          "Mean relative improvement in SLO attainment over the sweep (points where the baseline attains > 0), "
          "the way the paper reports +67.29 % vs Dynamo (always-disaggregated) and +339.74 % vs vLLM "
          "(co-located) on average.", "",
          "| workload | " + " | ".join(f"{x} vs {y}" for x, y in GAIN_PAIRS) + " |",
          "|---|" + "---|" * len(GAIN_PAIRS)]
    means = {pair: [] for pair in GAIN_PAIRS}
    for name, wl in report.items():
        row = []
        for key, (x, y) in zip(means, GAIN_PAIRS):
            g = rel_gain(att(wl, x), att(wl, y))
            row.append(_pct(g))
            if g is not None:
                means[key].append(g)
        L.append(f"| {name} | " + " | ".join(row) + " |")
    L.append("| **mean** | " + " | ".join(_pct(float(np.mean(v)) if v else None) for v in means.values()) + " |")
    L += ["", "Paper (real system, 3 models x 4 traces): +67.29 % vs Dynamo, +339.74 % vs vLLM on average.", "",
          "## Ablation: each improvement alone (on ampd*'s allocation)", "",
          "| workload | variant | " + " | ".join(f"{RATE_FRACTIONS[i]:.0%} rate" for i in ABLATION_POINTS)
          + " | mean |", "|---|---|" + "---|" * len(ABLATION_POINTS) + "---|"]
    for name, wl in report.items():
        for label, a in wl["ablation"].items():
            rates = " | ".join(f"{x:.2f}" for x in a)
            L.append(f"| {name} | {label} | {rates} | {np.mean(a):.3f} |")
    L += ["", "(Columns: fractions of the prefill-bound rate, i.e. the 3rd, 5th and 6th sweep points.)", "",
          DISCUSSION_MARK]
    path.write_text("\n".join(L) + (kept if kept else "\n\n## Discussion\n\n(to be written)\n"))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    cols = 2 if len(names) > 1 else 1
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    styles = {"ampd": ("C0", "-", "o"), "ampd*": ("C0", "--", "*"), "disagg": ("C1", "-", "s"),
              "colocated": ("C2", "-", "^"), "threshold": ("C3", ":", "d"), "dynamo": ("C4", "-.", "v"),
              "llm-d": ("C5", "-.", "P")}
    for ax, name in zip(axes.flat, names):
        wl = report[name]
        for label in POLICIES:
            color, ls, marker = styles[label]
            ax.plot(wl["rates"], att(wl, label), color=color, linestyle=ls, marker=marker,
                    label=f"{label} ({wl['allocations'][label]})")
        ax.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{name} · {wl['gpus']}×H20 · SLO {wl['ttft_slo']} s / {wl['itl_slo'] * 1000:.0f} ms", fontsize=9)
        ax.set_xlabel("session rate (1/s)")
        ax.set_ylabel("SLO attainment (rounds)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle("Llama-3.1-70B, simulated: each policy on its best allocation of the same GPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
