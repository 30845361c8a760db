"""`ampd-plugin workload gen|stats`: make a synthetic multi-round trace, or summarise one."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from ampd_plugin.workload import INPUT_MODES, PROFILES, generate, read_trace, workload_stats, write_trace


@click.group()
def workload() -> None:
    """Multi-round workloads: synthetic AMPD-paper profiles and JSONL traces (Mooncake/AIPerf schema)."""


@workload.command()
@click.option("--profile", "profile", required=True, type=click.Choice(sorted(PROFILES), case_sensitive=False),
              help="Workload profile from the AMPD paper.")
@click.option("--sessions", required=True, type=click.IntRange(min=1), help="Number of sessions.")
@click.option("--rate", required=True, type=click.FloatRange(min=0, min_open=True),
              help="Poisson session arrival rate (sessions/s).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same trace).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Output JSONL trace file.")
def gen(profile: str, sessions: int, rate: float, seed: int, out: str) -> None:
    """Generate a synthetic trace (input_length = new tokens of each round)."""
    generated = generate(profile.lower(), sessions, rate, seed)
    lines = write_trace(generated, out)
    click.echo(f"wrote {len(generated)} sessions, {lines} rounds to {out}", err=True)


@workload.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@click.option("--input-mode", type=click.Choice(INPUT_MODES), default=None,
              help="Whether input_length is each round's new tokens or the whole prompt (default: the format's "
                   "convention — Mooncake/AIPerf/ours incremental, Bailian cumulative).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def stats(trace: str, input_mode: str, as_json: bool) -> None:
    """Summarise a JSONL trace: sessions, rounds, token lengths, delays, arrival span."""
    try:
        summary = workload_stats(read_trace(trace, input_mode=input_mode))
    except ValueError as exc:  # TraceError included: names the line and the problem
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary))
        return
    console = Console()
    head = Table(title=f"{trace}", show_header=False)
    head.add_row("sessions", str(summary["sessions"]))
    head.add_row("rounds", str(summary["rounds"]))
    head.add_row("arrival span (s)", f"{summary['arrival_span_s']:.2f}")
    rate = summary["session_rate"]
    head.add_row("session rate (1/s)", f"{rate:.3f}" if rate is not None else "-")
    if summary["untimed_sessions"]:
        head.add_row("untimed sessions", f"{summary['untimed_sessions']} (replay with a --rate)")
    console.print(head)
    table = Table("per", "mean", "p50", "p90", "p99", "max")
    for label, key in (("rounds / session", "rounds_per_session"), ("input tokens / round", "input_tokens"),
                       ("output tokens / round", "output_tokens"), ("final context tokens", "final_context_tokens"),
                       ("tool delay (s)", "tool_delay_s")):
        row = summary[key]
        if row is None:
            continue
        table.add_row(label, *(f"{row[c]:.2f}" for c in ("mean", "p50", "p90", "p99", "max")))
    console.print(table)
