"""`ampd-plugin loadtest`: headless runs of the multi-round Locust test, and rate sweeps → goodput.

A thin wrapper: it builds a `locust` command line for the packaged locustfile and runs it in a child
process (Locust monkey-patches the interpreter with gevent, so it never runs inside this one), then reads
the report the locustfile wrote. A sweep runs one test per session rate with the same workload and seed,
plots attainment against rate and reports goodput (slo.goodput: the highest rate with attainment ≥ the
target, DistServe's definition).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import click

from ampd_plugin import slo
from ampd_plugin.loadtest import LOCUSTFILE

MAX_USERS = 1000  # one Locust user per session up to this many; beyond, users replay sessions in turn


@dataclass
class LoadTestSpec:
    host: str
    workload: str = "toolbench"
    trace: str = ""
    sessions: int | None = None
    session_rate: float | None = None
    duration_s: float = 600.0
    ttft_slo: float = 2.0
    itl_slo: float = 0.1
    slo_target: float = 0.9
    seed: int = 0
    report_dir: str = "loadtest-report"
    users: int | None = None
    workers: int = 0
    model: str = ""
    tokenizer: str = ""
    input_scale: float = 1.0
    output_scale: float = 1.0
    max_rounds: int = 0
    prompt_salt: str = ""
    extra: list[str] = field(default_factory=list)


def planned_sessions(spec: LoadTestSpec) -> int:
    from ampd_plugin.loadtest.schedule import build_sessions

    return len(build_sessions(spec.trace or spec.workload, spec.sessions, spec.session_rate, spec.seed,
                              is_trace=bool(spec.trace)))


def locust_command(spec: LoadTestSpec, users: int, master_port: int | None = None) -> list[str]:
    """The `python -m locust` command line of one headless run (the master's, in distributed mode)."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", spec.host, "-u", str(users), "-r", str(users),
        "--run-time", f"{max(1, int(spec.duration_s))}s", "--stop-timeout", "30",
        "--ttft-slo", str(spec.ttft_slo), "--itl-slo", str(spec.itl_slo), "--slo-target", str(spec.slo_target),
        "--seed", str(spec.seed), "--report-dir", str(spec.report_dir),
        "--input-scale", str(spec.input_scale), "--output-scale", str(spec.output_scale),
        "--max-rounds", str(spec.max_rounds),
    ]
    cmd += ["--trace", spec.trace] if spec.trace else ["--workload", spec.workload]
    for flag, value in (("--sessions", spec.sessions), ("--session-rate", spec.session_rate), ("--model", spec.model),
                        ("--tokenizer", spec.tokenizer), ("--prompt-salt", spec.prompt_salt)):
        if value:
            cmd += [flag, str(value)]
    if master_port is not None:
        cmd += ["--master", "--expect-workers", str(spec.workers), "--master-bind-host", "127.0.0.1",
                "--master-bind-port", str(master_port)]
    return cmd + list(spec.extra)


def run_loadtest(spec: LoadTestSpec, quiet: bool = False) -> tuple[int, dict | None]:
    """Run one headless test; (Locust's exit code, the report dict or None when none was written)."""
    users = spec.users or max(1, min(planned_sessions(spec), MAX_USERS))
    report_path = Path(spec.report_dir) / "report.json"
    report_path.unlink(missing_ok=True)
    out = subprocess.DEVNULL if quiet else None
    if spec.workers > 0:
        code = _run_distributed(spec, users, out)
    else:
        code = subprocess.run(locust_command(spec, users), stdout=out, stderr=out).returncode
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return code, report


def _run_distributed(spec: LoadTestSpec, users: int, out) -> int:
    from ampd_plugin.localcluster import free_port

    port = free_port()
    master = subprocess.Popen(locust_command(spec, users, master_port=port), stdout=out, stderr=out)
    workers = [
        subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                          "--master-host", "127.0.0.1", "--master-port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(spec.workers)
    ]
    try:
        return master.wait()
    finally:
        for proc in [master, *workers]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run_sweep(spec: LoadTestSpec, rates: list[float], quiet: bool = False) -> dict:
    """One run per rate (same workload and seed) → attainment curve and goodput; writes sweep.json/png."""
    base = Path(spec.report_dir)
    points = []
    for rate in rates:
        code, report = run_loadtest(replace(spec, session_rate=rate, report_dir=str(base / f"rate-{rate:g}")), quiet)
        att = report["summary"]["slo_attainment"] if report else 0.0
        points.append({"rate": rate, "exit_code": code, "slo_attainment": att,
                       "session_attainment": report["session_attainment"] if report else 0.0,
                       "ttft_p95": report["summary"]["ttft_p95"] if report else None,
                       "itl_p95": report["summary"]["itl_p95"] if report else None})
    curve = [(p["rate"], p["slo_attainment"]) for p in points]
    result = {"points": points, "goodput": slo.goodput(curve, spec.slo_target), "target": spec.slo_target}
    base.mkdir(parents=True, exist_ok=True)
    (base / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    from ampd_plugin.loadtest.report import plot_sweep

    plot_sweep(curve, result["goodput"], spec.slo_target, base / "sweep.png",
               title=f"{spec.trace or spec.workload}: attainment vs session rate")
    return result


def print_sweep(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"rate sweep — goodput {result['goodput']:g} sessions/s (≥ {100 * result['target']:.0f} %)")
    for col in ("rate (sessions/s)", "attainment", "session att.", "TTFT p95", "ITL p95"):
        t.add_column(col, justify="right")
    for p in result["points"]:
        ms = lambda v: "–" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
        t.add_row(f"{p['rate']:g}", f"{100 * p['slo_attainment']:.1f} %", f"{100 * p['session_attainment']:.1f} %",
                  ms(p["ttft_p95"]), ms(p["itl_p95"]))
    Console().print(t)


def _rates(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        rates = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise click.BadParameter("rates must be positive")
    return sorted(rates)


@click.command("loadtest")
@click.option("--host", required=True, help="Base URL of the OpenAI-compatible server or router, e.g. http://127.0.0.1:8000")
@click.option("--workload", default="toolbench", show_default=True, help="Profile (toolbench, gaia, hotpotqa, dureader, coding-agent) or trace path")
@click.option("--trace", default="", help="JSONL trace (Mooncake/AIPerf schema); overrides --workload")
@click.option("--sessions", type=int, default=None, help="Sessions to play (profile default 20; trace: all)")
@click.option("--session-rate", type=float, default=None, help="Poisson session arrivals per second (profile default 0.5; trace: its own times)")
@click.option("--duration", type=float, default=600, show_default=True, help="Hard time limit per run, seconds")
@click.option("--ttft-slo", type=float, default=2.0, show_default=True, help="TTFT SLO, seconds")
@click.option("--itl-slo", type=float, default=0.1, show_default=True, help="ITL (TPOT per round) SLO, seconds")
@click.option("--slo-target", type=float, default=0.9, show_default=True, help="Required attainment (exit code 1 below it)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report-dir", default="loadtest-report", show_default=True)
@click.option("--users", type=int, default=None, help="Concurrent Locust users (default: one per session)")
@click.option("--workers", type=int, default=0, show_default=True, help="Run distributed with this many local Locust workers")
@click.option("--model", default="", help="Model name (default: the server's first /v1/models entry)")
@click.option("--tokenizer", default="", help="Tokenizer dir/name for exact prompt lengths (default: the server's model path)")
@click.option("--input-scale", type=float, default=1.0, show_default=True, help="Scale every round's input length")
@click.option("--output-scale", type=float, default=1.0, show_default=True, help="Scale every round's output length")
@click.option("--max-rounds", type=int, default=0, help="Cut sessions to this many rounds (0: no cut)")
@click.option("--sweep", "sweep", default=None, help="Comma-separated session rates: run each, plot attainment, report goodput")
def loadtest(host, workload, trace, sessions, session_rate, duration, ttft_slo, itl_slo, slo_target, seed,
             report_dir, users, workers, model, tokenizer, input_scale, output_scale, max_rounds, sweep) -> None:
    """Multi-round SLO load test (Locust, headless) against HOST; optionally a rate sweep → goodput."""
    spec = LoadTestSpec(host=host, workload=workload, trace=trace, sessions=sessions, session_rate=session_rate,
                        duration_s=duration, ttft_slo=ttft_slo, itl_slo=itl_slo, slo_target=slo_target, seed=seed,
                        report_dir=report_dir, users=users, workers=workers, model=model, tokenizer=tokenizer,
                        input_scale=input_scale, output_scale=output_scale, max_rounds=max_rounds)
    try:
        planned_sessions(spec)  # fail fast on a bad workload name or trace, before starting Locust
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    rates = _rates(sweep)
    if rates:
        result = run_sweep(spec, rates)
        print_sweep(result)
        click.echo(f"sweep written to {Path(report_dir) / 'sweep.json'} and sweep.png")
        return
    code, report = run_loadtest(spec)
    if report is None:
        raise click.ClickException(f"Locust exited with {code} and wrote no report (see its output above)")
    sys.exit(code)
