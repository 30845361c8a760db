"""Planner fidelity on the CPU testbed: does the simulator, fed by a profiled cost model, predict what the
real vLLM-CPU deployment measures, and does the planner rank CPU allocations as the measurements do?

1. Start two vLLM-CPU workers with the `ampd` connector (tiny model, one core each) and `ampd-plugin profile`
   them: prefill/decode on the first, a KV transfer between them, and the serving path (API front end
   directly; router hop, remote call and history export through routers the profile starts) → fit.yaml.
2. For each candidate allocation of the 2 cores and each session rate (light, knee, overload): simulate the
   workload with the fitted model (`planner.simulate`, the same sessions and the same router settings as
   the load test), and measure it `--repeats` times with the Locust load test (`ampd-plugin loadtest`) through
   the router (`ampd-plugin route`) running the same policy.
3. Print P50/P95 TTFT and TPOT, simulated vs measured, with relative errors (goal: within 15 %), attainment
   in points (goal: within 5), and per repetition whether the planner's best candidate (highest simulated
   attainment, then lowest P95 TTFT) is the measured best. The "engine only" column is the same simulator
   with the serving-path terms set to zero: what those terms account for.

Candidates: colocated on one worker (1 core), colocated on two workers (2 cores, router binds sessions),
and AMPD P1+D1 (`ampd` connector, 2 cores). Run as root inside a loopback-only network namespace and
under the engine lock:
    ip netns add fid; ip netns exec fid ip link set lo up
    flock /tmp/ampd-engines.lock ip netns exec fid python benchmarks/planner_fidelity.py [--quick]
`--quick` bounds the run on a shared machine (fewer sessions, one repetition).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ampd_plugin.costmodel import FittedCostModel, Layout
from ampd_plugin.localcluster import free_port, in_isolated_netns, is_healthy, start_vllm, stop_all, wait_healthy
from ampd_plugin.loadtest.schedule import build_sessions
from ampd_plugin.planner.serving import ServingTerms
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


def simulated(cm, prefill: int, decode: int, policy: str, connector: str, rate: float, args, serving=None) -> dict:
    sessions = build_sessions(args.workload, args.sessions, rate, args.seed, args.input_scale, args.output_scale,
                              args.max_rounds)
    dep = Deployment(Pool(prefill, Layout(1)), Pool(decode, Layout(1)))
    result = simulate(dep, sessions, policy, cm, ttft_slo=args.ttft_slo, itl_slo=args.itl_slo, seed=args.seed,
                      kv_connector=connector, serving=serving)
    return result.summary(args.ttft_slo, args.itl_slo)


def rel_err(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real == 0:
        return None
    return abs(sim - real) / real


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="toolbench")
    ap.add_argument("--rates", default="1,3,6", help="session rates: light, knee, overload (sessions/s)")
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2, help="measured repetitions per candidate and rate")
    ap.add_argument("--quick", action="store_true", help="bounded run: 14 sessions per rate, one repetition")
    ap.add_argument("--input-scale", type=float, default=0.5)
    ap.add_argument("--output-scale", type=float, default=1.0)
    ap.add_argument("--max-rounds", type=int, default=3)
    ap.add_argument("--ttft-slo", type=float, default=0.5)
    ap.add_argument("--itl-slo", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="working directory (default: a temporary one)")
    ap.add_argument("--skip-ampd", action="store_true", help="only the candidates without the ampd connector")
    ap.add_argument("--resimulate", nargs="+", metavar="FIDELITY_JSON",
                    help="no engines: re-simulate the measurements of earlier runs with --profile and print them")
    ap.add_argument("--profile", help="fitted cost model for --resimulate")
    args = ap.parse_args()
    if args.resimulate:
        return resimulate(args)
    if args.quick:
        args.sessions, args.repeats = min(args.sessions, 14), 1
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
    print(f"load at start: {uptime()}")
    fit = work / "fit.yaml"

    # -- ampd connector workers: profile (direct + through the router) and the ampd candidates --------
    workers = [start_vllm(model, name=f"ampd{i}", log_dir=work, cpu=i, ampd=True) for i in range(2)]
    try:
        wait_healthy(workers, timeout_s=300)
        t0 = time.perf_counter()
        rc = run(["ampd-plugin", "profile", "--endpoint", workers[0].url, "--endpoint", workers[1].url,
                  "--out", str(fit), "--device", "cpu", "--kv-bytes-per-token", kv_bytes, "--hist", "0,512,1536",
                  "--incr", "32,256,1024", "--batches", "1,4,8", "--contexts", "128,1024", "--repeats", "2",
                  "--transfer", "256,2048"], 1200, work / "profile.log")
        if rc != 0:
            print((work / "profile.log").read_text()[-2000:])
            return 1
        print(f"profiled in {time.perf_counter() - t0:.0f}s -> {fit}")
        cm = FittedCostModel.from_yaml(fit)
        print(json.dumps(cm.meta["fit"]))
        print("serving terms:", json.dumps(cm.serving))
        for name, policy, connector, n_p, n_d in candidates:
            if connector == "ampd":
                rows += evaluate_candidate(name, policy, connector, [workers[0].url], [workers[1].url], cm, fit,
                                           rates, n_p, n_d, args, work)
    finally:
        stop_all(workers)

    # -- plain workers: the colocated candidates ------------------------------------------------------
    plain = [start_vllm(model, name=f"plain{i}", log_dir=work, cpu=i) for i in range(2)]
    try:
        wait_healthy(plain, timeout_s=300)
        for name, policy, connector, n_p, n_d in candidates:
            if connector == "none":
                rows += evaluate_candidate(name, policy, connector, [], [w.url for w in plain[:n_d]], cm, fit,
                                           rates, n_p, n_d, args, work)
    finally:
        stop_all(plain)

    print(f"load at end: {uptime()}")
    print_rows(rows, args)
    (work / "fidelity.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"raw results: {work / 'fidelity.json'}")
    return 0


def resimulate(args) -> int:
    """Simulate again, with `--profile`, the (candidate, rate) points that earlier runs measured."""
    if not args.profile:
        print("--resimulate needs --profile FIT.yaml", file=sys.stderr)
        return 2
    cm = FittedCostModel.from_yaml(args.profile)
    print("serving terms:", json.dumps(cm.serving))
    specs = {c[0]: c for c in CANDIDATES}
    rows, cache, rep_offset = [], {}, 0
    for path in args.resimulate:
        data = json.loads(Path(path).read_text())
        run_args = argparse.Namespace(**{**vars(args), **data.get("args", {})}) if isinstance(data, dict) else args
        measured = data["rows"] if isinstance(data, dict) else data
        for r in measured:
            name, policy, connector, n_p, n_d = specs[r["candidate"]]
            key = (name, r["rate"], run_args.sessions)
            if key not in cache:
                engine_only = ServingTerms.for_model(cm).replace(router_s=0.0, remote_s=0.0, export_s=0.0,
                                                                 frontend_s=0.0)
                cache[key] = (pick(simulated(cm, n_p, n_d, policy, connector, r["rate"], run_args)),
                              pick(simulated(cm, n_p, n_d, policy, connector, r["rate"], run_args, engine_only)))
            rows.append({**r, "rep": r["rep"] + rep_offset, "sim": cache[key][0], "engine_only": cache[key][1]})
        rep_offset = max(r["rep"] for r in rows) + 1
    print_rows(rows, args)
    return 0


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def evaluate_candidate(name, policy, connector, prefill, decode, cm, fit, rates, n_p, n_d, args, work) -> list[dict]:
    out = []
    router, url = start_router(prefill, decode, policy, connector, fit, args, work / f"router-{slug(name)}.log")
    engine_only = ServingTerms.for_model(cm).replace(router_s=0.0, remote_s=0.0, export_s=0.0, frontend_s=0.0)
    try:
        for rate in rates:
            sim = pick(simulated(cm, n_p, n_d, policy, connector, rate, args))
            eng = pick(simulated(cm, n_p, n_d, policy, connector, rate, args, serving=engine_only))
            for rep in range(args.repeats):
                real = measure(url, rate, args, work / f"lt-{slug(name)}-{rate:g}-{rep}")
                out.append({"candidate": name, "rate": rate, "rep": rep, "sim": sim, "engine_only": eng,
                            "real": pick(real) if real else None, "load": uptime()})
                print(f"{name:<14} rate {rate:<4g} rep {rep} sim  {fmt(sim)}\n{'':<31}real {fmt(out[-1]['real'])}"
                      f"  (load {out[-1]['load']})", flush=True)
    finally:
        stop_router(router)
    return out


KEYS = ("slo_attainment", "ttft_p50", "ttft_p95", "itl_p50", "itl_p95", "rounds", "errors", "local_fraction")
LATENCY = ("ttft_p50", "ttft_p95", "itl_p50", "itl_p95")


def pick(summary: dict) -> dict:
    return {k: summary.get(k) for k in KEYS}


def fmt(d: dict | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).lower()


def print_rows(rows: list[dict], args) -> None:
    print("\n| candidate | rate | rep | metric | simulated | engine only | measured | error | error (engine only) |")
    print("|---|---|---|---|---|---|---|---|---|")
    errs: dict[str, list[float]] = {"sim": [], "engine_only": []}
    att_gaps = []
    for r in rows:
        real = r["real"] or {}
        for k in LATENCY + ("slo_attainment",):
            m = real.get(k)
            cells = []
            for side in ("sim", "engine_only"):
                if k == "slo_attainment":
                    gap = None if m is None else abs(r[side][k] - m) * 100
                    cells.append("-" if gap is None else f"{gap:.1f} pt")
                    if side == "sim" and gap is not None:
                        att_gaps.append(gap)
                    continue
                e = rel_err(r[side].get(k), m)
                if e is not None:
                    errs[side].append(e)
                cells.append("-" if e is None else f"{e:.0%}")
            s, c = r["sim"].get(k), r["engine_only"].get(k)
            print(f"| {r['candidate']} | {r['rate']:g} | {r['rep']} | {k} | {_num(s)} | {_num(c)} | {_num(m)} | "
                  f"{cells[0]} | {cells[1]} |")
    for side, e in errs.items():
        if e:
            print(f"{side}: latency percentiles within 15 %: {sum(x <= 0.15 for x in e)}/{len(e)} "
                  f"({sum(x <= 0.15 for x in e) / len(e):.0%}); median error {sorted(e)[len(e) // 2]:.0%}")
    if att_gaps:
        print(f"attainment within 5 points: {sum(g <= 5 for g in att_gaps)}/{len(att_gaps)}; "
              f"median gap {sorted(att_gaps)[len(att_gaps) // 2]:.1f} points")
    # Ranking: attainment summed over the rates, ties broken by summed P95 TTFT (as the planner does).
    names = sorted({r["candidate"] for r in rows})

    def rank(side: str, rep: int | None) -> list[str]:
        def key(n):
            mine = [r[side] or {} for r in rows if r["candidate"] == n and (rep is None or r["rep"] == rep)]
            return (-round(sum(m.get("slo_attainment") or 0 for m in mine), 6),
                    sum(m.get("ttft_p95") or 1e9 for m in mine))
        return sorted(names, key=key)

    planned = rank("sim", 0)
    print(f"planner ranking (simulated): {planned}")
    for rep in sorted({r["rep"] for r in rows}):
        measured = rank("real", rep)
        print(f"repetition {rep}: measured ranking {measured}; planner's top is the measured best: "
              f"{planned[:1] == measured[:1]}")


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


if __name__ == "__main__":
    sys.exit(main())
