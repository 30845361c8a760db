"""`ampd-plugin plan`: ranked prefill/decode allocations for a multi-round workload, plus launch scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ampd_plugin.planner.emit import ENGINES, TARGETS, RouterOptions, build_deployment, slug, write_deployment
from ampd_plugin.planner.latency_tables import WorkloadStats
from ampd_plugin.costmodel import LinkPricing
from ampd_plugin.planner.placement import PlacementError
from ampd_plugin.planner.search import PlanInfeasible, PlanRequest, PlanResult, search


def _degrees(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, e.g. 1,2,4,8; got {value!r}")
    if not out or any(n <= 0 for n in out):
        raise click.BadParameter("degrees must be positive integers")
    return out


def _positive(_ctx, param, value):
    if value is not None and not value > 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def _served_model(model: str, explicit: str | None) -> str:
    """What the launch commands pass to the engine: --served-model, the preset's HF id, or the config dir."""
    if explicit:
        return explicit
    from ampd_plugin.costmodel import model_presets

    for name, preset in model_presets().items():
        if name.lower() == model.lower():
            return preset.get("hf_id") or name
    path = Path(model)
    return str(path.parent if path.name == "config.json" else path)


@click.command("plan")
@click.option("--model", help="Model preset (Llama-3.1-70B, Qwen3-32B, Mixtral-8x7B) or a config.json path.")
@click.option("--gpu", help="GPU preset for the roofline (H20, H100, H200, A100-80G, L40S); default H20.")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False),
              help="Fitted cost model from `ampd-plugin profile` (layouts it lacks use the roofline of --model).")
@click.option("--gpus", type=int, required=True, callback=_positive, help="GPU budget N.")
@click.option("--gpus-per-node", type=int, callback=_positive,
              help="GPUs per node (TP stays inside a node); default: the GPU preset's, else 8.")
@click.option("--link-bw", type=float, callback=_positive, help="Intra-node bandwidth per GPU, GB/s one direction.")
@click.option("--net-bw", type=float, callback=_positive, help="Cross-node bandwidth per GPU, GB/s one direction.")
@click.option("--workload", required=True, help="Workload profile (toolbench, gaia, hotpotqa, dureader, coding-agent) or a JSONL trace.")
@click.option("--rate", type=float, required=True, callback=_positive, help="Session arrival rate (sessions/s).")
@click.option("--sessions", type=int, default=400, show_default=True, callback=_positive,
              help="Sessions sampled to characterise the workload (and simulated per rate).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ttft-slo", type=float, required=True, callback=_positive, help="TTFT SLO in seconds.")
@click.option("--itl-slo", type=float, required=True, callback=_positive, help="ITL (TPOT) SLO in seconds.")
@click.option("--engine", type=click.Choice(ENGINES), default="vllm", show_default=True)
@click.option("--policy", default="ampd", show_default=True, help="Routing policy the deployment will run.")
@click.option("--degrees", default="1,2,4,8", show_default=True, callback=_degrees, help="Parallel (TP) degrees.")
@click.option("--mixed-degrees", is_flag=True, help="Allow several degrees in one pool (not simulated).")
@click.option("--top", "top_k", type=int, default=3, show_default=True, callback=_positive, help="Candidates to keep.")
@click.option("--simulate/--no-simulate", "do_simulate", default=True, show_default=True,
              help="Confirm candidates with the discrete-event simulator over a rate sweep.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write launch.sh + deployment.yaml per candidate.")
@click.option("--target", type=click.Choice(TARGETS), default="gpu", show_default=True,
              help="cpu-demo: vLLM-CPU workers on this machine's cores (one per replica).")
@click.option("--served-model", help="Model name/path the launch commands serve (default: the preset's HF id).")
@click.option("--max-model-len", type=int, callback=_positive, help="Passed to the engines when given.")
@click.option("--router-host", default="127.0.0.1", show_default=True)
@click.option("--router-port", type=int, default=8000, show_default=True)
def plan(model, gpu, profile_path, gpus, gpus_per_node, link_bw, net_bw, workload, rate, sessions, seed, ttft_slo,
         itl_slo, engine, policy, degrees, mixed_degrees, top_k, do_simulate, as_json, out_dir, target,
         served_model, max_model_len, router_host, router_port):
    """Search prefill/decode replicas and TP degrees under a GPU budget (ILP + simulation) and emit launch scripts."""
    from ampd_plugin.costmodel import build_cost_model, load_gpu_spec
    from ampd_plugin.workload import load_workload

    console = Console(stderr=True, quiet=as_json)
    if model is None and profile_path is None:
        raise click.UsageError("give --model (roofline) or --profile (fitted), or both")
    try:
        base = build_cost_model(model, gpu, profile_path)
        if gpus_per_node is None:
            gpus_per_node = load_gpu_spec(gpu).gpus_per_node if gpu else 8
        cost_model = LinkPricing(base, link_gbps=link_bw, net_gbps=net_bw) if (link_bw or net_bw) else base
        with console.status("characterising the workload"):
            stats = WorkloadStats.from_sessions(load_workload(workload, sessions, rate, seed), name=str(workload))
        req = PlanRequest(cost_model, stats, rate, ttft_slo, itl_slo, gpus, degrees, gpus_per_node, policy, top_k,
                          homogeneous=not mixed_degrees, engine=engine)
        simulator = None
        if do_simulate:
            from ampd_plugin.planner.confirm import make_simulator

            simulator = make_simulator(req, workload, sessions, seed, link_bw, net_bw)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            rate_factors = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
            task = progress.add_task("solving the integer program", total=top_k * len(rate_factors) if simulator else None)

            def step(message: str) -> None:
                progress.update(task, description=message, advance=1)

            result = search(req, simulator, rate_factors=rate_factors, progress=step)
    except PlanInfeasible as exc:
        if as_json:
            click.echo(json.dumps({"feasible": False, "reason": str(exc)}, indent=2))
            sys.exit(2)
        raise click.ClickException(f"no feasible deployment:\n{exc}")
    except (ValueError, PlacementError) as exc:
        raise click.ClickException(str(exc))

    written = []
    if out_dir:
        served = _served_model(model or "", served_model) if (model or served_model) else "MODEL"
        if profile_path:  # the router predicts with the same cost model the plan used
            extra = ["--profile", str(Path(profile_path).resolve())]
        else:
            extra = ["--cost-model", model] + (["--gpu", gpu] if gpu else [])
        router = RouterOptions(policy, ttft_slo, itl_slo, router_host, router_port, extra=extra)
        for rank, cand in enumerate(result.candidates, 1):
            dep = build_deployment(cand.label(), cand.placement, engine, served, router, target, max_model_len,
                                   summary=cand.to_dict())
            directory = Path(out_dir) / f"{rank:02d}-{slug(cand.label())}"
            written.append(write_deployment(dep, directory))
    if as_json:
        out = {"feasible": True, **result.to_dict()}
        out["written"] = [[str(s), str(y)] for s, y in written]
        click.echo(json.dumps(out, indent=2))
        return
    out_console = Console() if sys.stdout.isatty() else Console(width=160)
    print_table(result, out_console)
    for script, desc in written:
        out_console.print(f"wrote {script} and {desc}")


def _fmt(v, pattern="{:.3f}") -> str:
    return "-" if v is None else pattern.format(v)


def print_table(result: PlanResult, console: Console) -> None:
    req = result.request
    table = Table(title=f"{req.stats.name} at {req.rate:g} sessions/s, {req.gpus} GPUs, policy {req.policy} "
                        f"(TTFT ≤ {req.ttft_slo:g}s, ITL ≤ {req.itl_slo:g}s)")
    for col in ("#", "allocation", "GPUs", "Z*", "TTFT95*", "ITL95*", "KV on NVLink",
                "attain", "TTFT95", "ITL95", "goodput"):
        table.add_column(col, justify="left" if col == "allocation" else "right", no_wrap=True)
    for i, c in enumerate(result.candidates, 1):
        pre = c.predicted.get("prefill") or c.predicted.get("colocated") or {}
        dec = c.predicted.get("decode") or c.predicted.get("colocated") or {}
        ttft = max((d.get("ttft_p95") or 0 for d in pre.get("per_degree", {}).values()), default=None)
        itl = max((d.get("itl_p95") or 0 for d in dec.get("per_degree", {}).values()), default=None)
        sim = c.simulated or {}
        table.add_row(str(i), c.label(), str(c.gpus), _fmt(c.objective, "{:.2f}"), _fmt(ttft), _fmt(itl),
                      _fmt(c.placement.intra_node_fraction if c.placement else None, "{:.0%}"),
                      _fmt(sim.get("slo_attainment"), "{:.1%}"), _fmt(sim.get("ttft_p95")), _fmt(sim.get("itl_p95")),
                      ("≥" if c.goodput_capped else "") + _fmt(c.goodput, "{:.3g}"))
    console.print(table)
    console.print("* ILP surrogate (Z = worst per-replica P95 / its SLO); attain/TTFT95/ITL95 simulated at the "
                  "target rate under the policy; goodput = highest simulated session rate with ≥ 90 % attainment.")
    console.print(f"ILP solved in {result.solve_seconds:.2f}s (HiGHS).")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
