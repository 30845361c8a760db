"""`ampd-plugin demo`: AMPD against always-disaggregated and co-located serving, on real vLLM-CPU engines.

What it does (all on 127.0.0.1, inside a fresh loopback-only network namespace because Mooncake binds
every interface — creating one needs root):
1. builds the demo model (a random Llama, see DEMO_MODEL) — no download;
2. starts two vLLM-CPU workers with the `ampd` KV connector, each pinned to its own core;
3. for each policy (default ampd, disagg, colocated), with the same workload, seed and prompts:
   resets both workers' prefix caches, starts `ampd-plugin route` with that policy, plays the same
   multi-round Locust load (`ampd-plugin loadtest` machinery) for about `--duration` seconds, reads the
   router's /metrics (routes chosen, KV bytes moved), stops the router;
4. prints one table side by side and writes everything under `--out`.

The three deployments use the same two engine processes:
- `ampd`: worker 0 is a prefill worker, worker 1 a decode worker; every round is routed by AMPD's
  Algorithm 1 (remote on the prefill worker, or local on the session's decode worker) and each queue is
  ordered by Algorithm 2.
- `disagg`: the same prefill/decode split; every prefill is remote (vLLM/Dynamo/DistServe-style PD).
- `colocated`: both workers are given to the router as decode workers with no prefill pool; a session
  is bound to one of them (least KV in use) and every round — prefill and decode — runs there, like two
  independent vLLM replicas behind a session-affinity load balancer. The router runs with
  `--kv-connector none`, so no KV moves between workers (no context migration either); the engines still
  load the connector, which does nothing for requests without transfer parameters.

Stopping: every process it started is stopped by PID (process group) at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import click

# The demo's model and load, chosen so that the trade-offs show on two CPU cores (docs/demo.md explains).
DEMO_MODEL = dict(hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                  max_position_embeddings=16384)
DEMO_WORKLOAD = dict(workload="toolbench", input_scale=1.0, output_scale=1.0, max_rounds=6)
DEMO_TTFT_SLO, DEMO_ITL_SLO, DEMO_SLO_TARGET = 2.0, 0.03, 0.9
DEMO_RATE = 0.8  # sessions/s
# `ampd` is the paper's policy; `ampd*` adds this project's improvements (predictive slack, ITL-aware local
# gate), which win in the simulator (docs/paper_scale.md) — the demo shows both against the baselines.
POLICY_ALIASES = {"ampd*": "ampd:predictive=true:itl_aware=true"}
POLICIES = ("ampd", "ampd*", "disagg", "colocated")
ROUTER_START_TIMEOUT_S = 60


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
    kv_bytes_moved: float | None = None  # measured by the engines' connectors (vllm:ampd_kv_read_bytes_total)
    router_kv_bytes_estimate: float | None = None  # the router's estimate (tokens × its cost model's bytes/token)
    exit_code: int | None = None
    failure: str = ""
    run: int = 0


# ------------------------------------------------------------------------------------------- router


class RouterProcess:
    """`ampd-plugin route` as a child process in its own process group (stopped by its PID)."""

    def __init__(self, policy: str, prefill: list[str], decode: list[str], port: int, log_path: Path,
                 ttft_slo: float, itl_slo: float, kv_connector: str = "ampd", extra: tuple[str, ...] = ()) -> None:
        name, params = split_policy_spec(policy)
        argv = [sys.executable, "-m", "ampd_plugin.cli", "route", "--policy", name, "--kv-connector", kv_connector,
                *extra,
                "--ttft-slo", str(ttft_slo), "--itl-slo", str(itl_slo), "--host", "127.0.0.1", "--port", str(port)]
        for param in params:
            argv += ["--param", param]
        for url in prefill:
            argv += ["--prefill", url]
        for url in decode:
            argv += ["--decode", url]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._log.write(" ".join(argv) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = ROUTER_START_TIMEOUT_S) -> None:
        from ampd_plugin.localcluster import is_healthy, log_tail

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}; log {self.log_path}:\n{log_tail(self.log_path, 30)}")
            if is_healthy(self.url):
                return
            time.sleep(0.5)
        raise TimeoutError(f"router not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{log_tail(self.log_path, 30)}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def engine_kv_bytes(urls: list[str]) -> float | None:
    """KV bytes the workers' ampd connectors read from peers (pull model: every byte moved is read once)."""
    from ampd_plugin.localcluster import metric_sum, scrape_metrics

    try:
        return sum(metric_sum(scrape_metrics(u), "vllm:ampd_kv_read_bytes_total") for u in urls)
    except OSError:
        return None


def router_numbers(url: str) -> tuple[float | None, float | None]:
    """(local fraction of routed prefills, KV bytes moved) from the router's Prometheus /metrics."""
    from ampd_plugin.localcluster import metric_sum, scrape_metrics

    try:
        m = scrape_metrics(url, prefix="ampd_router_")
    except OSError:
        return None, None
    local = metric_sum(m, "ampd_router_routes_total", route="local")
    total = metric_sum(m, "ampd_router_routes_total")
    kv = metric_sum(m, "ampd_router_kv_bytes_moved_total")
    return (local / total if total else None), kv


# ------------------------------------------------------------------------------------------- the run


def _post(url: str, body: dict, timeout_s: float = 120.0) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        resp.read()


def warm_up(url: str) -> None:
    """One short request so the first timed round does not pay vLLM's first-request cost."""
    _post(url + "/v1/completions", {"prompt": "warm up " * 20, "max_tokens": 8, "ignore_eos": True, "temperature": 0})


def _slug(policy: str) -> str:
    return policy.replace(":", "_").replace("=", "-")


def split_policy_spec(spec: str) -> tuple[str, list[str]]:
    """`ampd:itl_aware=true:predictive=true` -> ("ampd", ["itl_aware=true", "predictive=true"]).

    Lets the demo compare a policy with its options (the router's `--param NAME=VALUE`) side by side.
    """
    name, *params = POLICY_ALIASES.get(spec, spec).split(":")
    return name, params


def check_policy_spec(spec: str) -> None:
    """Raise click.BadParameter for an unknown policy or parameter (the registry's own message)."""
    from ampd_plugin.router.cli import _policy_params  # the router's own NAME=VALUE parsing
    from ampd_plugin.router.costs import router_cost_model
    from ampd_plugin.router_policy.registry import load_policy

    name, params = split_policy_spec(spec)
    try:
        load_policy(name, router_cost_model(), **_policy_params(tuple(params)))
    except (ValueError, click.BadParameter) as exc:
        raise click.BadParameter(f"{spec!r}: {exc}", param_hint="--policies") from exc


def run_policy(policy: str, workers: list, out: Path, duration_s: float, sessions: int, rate: float, seed: int,
               slo: dict, status=None) -> PolicyResult:
    from ampd_plugin.localcluster import free_port, reset_prefix_cache
    from ampd_plugin.loadtest_cli import LoadTestSpec, run_loadtest

    p, d = workers
    colocated = split_policy_spec(policy)[0] == "colocated"
    prefill, decode = ([], [p.url, d.url]) if colocated else ([p.url], [d.url])
    for w in workers:
        reset_prefix_cache(w.url)  # every policy starts from cold caches
    # Co-located replicas move no KV: the router runs without a KV connector (no context migration either).
    router = RouterProcess(policy, prefill, decode, free_port(), out / f"router-{_slug(policy)}.log",
                           slo["ttft_slo"], slo["itl_slo"], kv_connector="none" if colocated else "ampd")
    result = PolicyResult(policy)
    kv_before = engine_kv_bytes([w.url for w in workers])
    try:
        router.wait_ready()
        spec = LoadTestSpec(host=router.url, sessions=sessions, session_rate=rate, seed=seed,
                            duration_s=duration_s + 120, report_dir=str(out / _slug(policy)), **DEMO_WORKLOAD, **slo)
        if status is not None:
            status.update(f"[bold]{policy}[/]: {sessions} sessions at {rate:g}/s (about {duration_s:.0f} s) …")
        code, report = run_loadtest(spec, quiet=True)
        result.exit_code = code
        if report is None:
            result.failure = f"load test wrote no report (exit {code})"
            return result
        s = report["summary"]
        result.attainment, result.session_attainment = s["slo_attainment"], report["session_attainment"]
        result.ttft_p50, result.ttft_p95, result.itl_p50, result.itl_p95 = (
            s["ttft_p50"], s["ttft_p95"], s["itl_p50"], s["itl_p95"])
        result.rounds, result.errors = s["rounds"], s["errors"]
        result.local_fraction, result.router_kv_bytes_estimate = router_numbers(router.url)
        kv_after = engine_kv_bytes([w.url for w in workers])
        if kv_before is not None and kv_after is not None:
            result.kv_bytes_moved = kv_after - kv_before
    finally:
        router.stop()
    return result


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
        ("KV bytes moved (connectors)", "kv_bytes_moved", mib),
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
             seed: int, slo: dict, repeats: int = 1) -> list[PolicyResult]:
    from rich.console import Console

    from ampd_plugin.localcluster import start_vllm, stop_all, wait_healthy
    from ampd_plugin.tiny_model import TinyModelSpec, build_tiny_model

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    sessions = sessions or max(2, round(rate * duration_s))
    workers: list = []
    results: list[PolicyResult] = []
    try:
        with console.status("building the demo model (random Llama + BPE tokenizer; first time ~1 min) …"):
            model = build_tiny_model(TinyModelSpec(**DEMO_MODEL))
        console.print(f"model: {model}")
        t0 = time.monotonic()
        with console.status("starting vLLM-CPU workers with the ampd connector (core 0 and core 1; 35–70 s) …") as st:
            for i in range(2):
                workers.append(start_vllm(model, name=f"worker{i}", log_dir=out / "logs", cpu=i, ampd=True,
                                          dev_mode=True, max_model_len=DEMO_MODEL["max_position_embeddings"]))
            wait_healthy(workers, timeout_s=300)
            st.update("warming up the workers …")
            for w in workers:
                warm_up(w.url)
        console.print(f"workers ready in {time.monotonic() - t0:.0f} s: " + ", ".join(f"{w.name} {w.url} (pid {w.pid})" for w in workers))
        for run in range(repeats):
            # run k uses seed+k; the policy order rotates so no policy always goes first (warm-up bias)
            order = policies[run % len(policies):] + policies[:run % len(policies)]
            for policy in order:
                run_out = out if repeats == 1 else out / f"run{run}"
                run_out.mkdir(parents=True, exist_ok=True)
                with console.status(f"[bold]{policy}[/]: starting the router …") as st:
                    result = run_policy(policy, workers, run_out, duration_s, sessions, rate, seed + run, slo, status=st)
                result.run = run
                results.append(result)
                console.print(f"run {run + 1}/{repeats} {policy}: attainment {'–' if result.attainment is None else f'{100 * result.attainment:.1f} %'}"
                              f" over {result.rounds} rounds" + (f" [red]({result.failure})[/]" if result.failure else ""))
    finally:
        with console.status("stopping every process the demo started …"):
            stop_all(workers)
    title = (f"ampd-plugin demo — {DEMO_WORKLOAD['workload']} (≤{DEMO_WORKLOAD['max_rounds']} rounds), {sessions} "
             f"sessions at {rate:g}/s, SLO TTFT {slo['ttft_slo']:g} s / ITL {1000 * slo['itl_slo']:g} ms, "
             f"1 prefill + 1 decode worker, one CPU core each")
    print_table(results, console, title)
    (out / "demo.json").write_text(json.dumps({"title": title, "model": DEMO_MODEL, "workload": DEMO_WORKLOAD,
                                               "slo": slo, "rate": rate, "sessions": sessions, "seed": seed, "repeats": repeats,
                                               "results": [asdict(r) for r in results]}, indent=2) + "\n")
    console.print(f"reports: {out}/<policy>/report.json, records.csv, report.png; summary {out}/demo.json")
    if not keep_logs:
        for log in (out / "logs").glob("*.log"):
            log.unlink()
        for log in out.rglob("router-*.log"):
            log.unlink()
    return results


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


@click.command("demo")
@click.option("--duration", type=float, default=75, show_default=True, help="Seconds of load per policy (about)")
@click.option("--sessions", type=int, default=None, help="Sessions per policy (default: rate × duration)")
@click.option("--session-rate", type=float, default=DEMO_RATE, show_default=True, help="Poisson session arrivals per second")
@click.option("--policies", default=",".join(POLICIES), show_default=True, help="Comma-separated router policies to compare; NAME:param=value:... passes router --param options; ampd* = ampd:predictive=true:itl_aware=true")
@click.option("--out", "out", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--keep-logs", is_flag=True, help="Keep the engines' and routers' logs under --out")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Run every policy this many times (seeds seed..seed+N-1, rotating order); cells show median (min–max)")
@click.option("--ttft-slo", type=float, default=DEMO_TTFT_SLO, show_default=True, help="TTFT SLO, seconds")
@click.option("--itl-slo", type=float, default=DEMO_ITL_SLO, show_default=True, help="ITL (TPOT per round) SLO, seconds")
def demo(duration, sessions, session_rate, policies, out, keep_logs, seed, repeats, ttft_slo, itl_slo) -> None:
    """Compare AMPD with always-disaggregated and co-located serving on real vLLM-CPU engines (needs root)."""
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
        results = run_demo(duration, sessions, session_rate, names, Path(out), keep_logs, seed, slo, max(1, repeats))
    except KeyboardInterrupt:
        click.echo("interrupted; everything the demo started was stopped", err=True)
        sys.exit(130)
    sys.exit(0 if results and all(not r.failure for r in results) else 1)
