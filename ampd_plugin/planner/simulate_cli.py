"""`ampd-plugin simulate`: run one workload on one deployment under one policy in the simulator."""

from __future__ import annotations

import json

import click
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ampd_plugin.costmodel import BACKENDS, Layout, build_cost_model
from ampd_plugin.planner.simulate import Deployment, Pool, parse_pool
from ampd_plugin.planner.simulate import simulate as run_simulation
from ampd_plugin.router_policy.registry import available_policies
from ampd_plugin.workload import PROFILES, load_workload

POSITIVE = click.FloatRange(min=0, min_open=True)


def _pool(ctx: click.Context, param: click.Parameter, value: str) -> object:
    try:
        return parse_pool(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _policy(ctx: click.Context, param: click.Parameter, value: str) -> str:
    known = available_policies()
    if value not in known:
        raise click.BadParameter(f"unknown policy {value!r}; known policies: {', '.join(known)}")
    return value


def _params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(raw)  # 0.8 -> float, true -> bool, 512 -> int
    return out


@click.command()
@click.option("--workload", required=True, metavar="{" + ",".join(PROFILES) + ",PATH}",
              help="A paper workload profile or a JSONL trace file.")
@click.option("--model", required=True, help="Model preset (e.g. Llama-3.1-70B) or a HF config.json path.")
@click.option("--gpu", default="H20", show_default=True, help="GPU preset for the roofline cost model.")
@click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Fitted cost-model YAML from `ampd-plugin profile` (roofline for layouts it lacks).")
@click.option("--prefill", required=True, callback=_pool, metavar="N[xTP]", help="Prefill pool, e.g. 2x4 (0 = none).")
@click.option("--decode", required=True, callback=_pool, metavar="N[xTP]", help="Decode pool, e.g. 1x8.")
@click.option("--policy", default="ampd", show_default=True, callback=_policy,
              help="Routing policy (an `ampd_plugin.policies` entry point).")
@click.option("--param", "-o", "params", multiple=True, callback=_params, metavar="KEY=VALUE",
              help="Policy parameter, repeatable (e.g. -o alpha=0.8 -o locality=true).")
@click.option("--rate", type=POSITIVE, default=None, help="Session arrival rate (1/s); required for profiles, "
              "replaces a trace's arrival times when given.")
@click.option("--sessions", type=click.IntRange(min=1), default=None,
              help="Number of sessions (profiles; for a trace: the first N).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for the workload and the policy.")
@click.option("--ttft-slo", required=True, type=POSITIVE, help="TTFT SLO in seconds (every prefill).")
@click.option("--itl-slo", required=True, type=POSITIVE, help="ITL (TPOT) SLO in seconds.")
@click.option("--engine", type=click.Choice(BACKENDS), default="vllm", show_default=True,
              help="What the workers run: prices remote rounds as it does them (SGLang recomputes the history on "
                   "the prefill worker; vLLM reads it from the decode worker).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object (no progress bar).")
def simulate_cmd(workload, model, gpu, profile, prefill, decode, policy, params, rate, sessions, seed,
                 ttft_slo, itl_slo, engine, as_json) -> None:
    """Simulate a multi-round workload on a prefill/decode deployment and report SLO attainment."""
    try:
        cost = build_cost_model(model, gpu, profile)
        if workload.lower() in PROFILES and sessions is None:
            raise ValueError(f"workload profile {workload!r} needs --sessions")
        if workload.lower() in PROFILES and rate is None:
            raise ValueError(f"workload profile {workload!r} needs --rate")
        sessions_list = load_workload(workload.lower() if workload.lower() in PROFILES else workload,
                                      sessions=sessions, rate=rate, seed=seed)
        if engine == "sglang" and prefill.count and prefill.layout.tp != decode.layout.tp:
            raise ValueError("the SGLang ampd backend needs the same TP on prefill and decode workers")
        deployment = Deployment(*(Pool(p.count, Layout(p.layout.tp, p.layout.pp, backend=engine))
                                  for p in (prefill, decode)))
        connector = "ampd" if prefill.count else "none"  # as `plan` emits the router for it
        if as_json:
            result = run_simulation(deployment, sessions_list, policy, cost, ttft_slo=ttft_slo, itl_slo=itl_slo,
                              seed=seed, policy_params=params, kv_connector=connector)
        else:
            with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("sessions"),
                          TimeElapsedColumn(), transient=True) as bar:
                task = bar.add_task("sim", total=len(sessions_list))
                result = run_simulation(deployment, sessions_list, policy, cost, ttft_slo=ttft_slo, itl_slo=itl_slo,
                                  seed=seed, policy_params=params, kv_connector=connector,
                                  progress=lambda done, total: bar.update(task, completed=done))
    except ValueError as exc:  # bad preset/GPU/trace/parameter: the message names the problem
        raise click.ClickException(str(exc)) from None

    summary = result.summary(ttft_slo, itl_slo)
    summary.update(workload=workload, model=model, gpu=gpu, rate=rate, seed=seed, policy_params=params, engine=engine)
    if as_json:
        click.echo(json.dumps(summary))
        return
    _print_table(summary, deployment)


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def _print_table(s: dict, deployment: Deployment) -> None:
    table = Table(title=f"{s['workload']} · {s['model']} on {s['gpu']} · {deployment} ({deployment.gpus} GPUs) · "
                        f"policy {s['policy']}", show_header=False)
    rows = [
        ("rounds / sessions", f"{s['rounds']} / {s['sessions']}"),
        ("SLO attainment (rounds)", f"{s['slo_attainment']:.1%}"),
        ("SLO attainment (sessions)", f"{s['session_attainment']:.1%}"),
        ("TTFT p50 / p95", f"{_fmt(s['ttft_p50'], ' s')} / {_fmt(s['ttft_p95'], ' s')}  (SLO {s['ttft_slo']} s)"),
        ("ITL p50 / p95", f"{_fmt(s['itl_p50'], ' s')} / {_fmt(s['itl_p95'], ' s')}  (SLO {s['itl_slo']} s)"),
        ("local prefills", f"{s['local_fraction']:.1%}"),
        ("KV moved", f"{s['kv_bytes_moved'] / 1e9:.2f} GB"),
        ("evictions / migrations", f"{s['evictions']} / {s['migrations']}"),
        ("errors", str(s["errors"])),
        ("simulated / wall", f"{s['simulated_s']:.1f} s / {s['wall_s']:.2f} s ({s['events']} events)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


simulate = simulate_cmd  # the name cli.COMMANDS points at
