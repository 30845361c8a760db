"""The load test's report: numbers (all from ampd_plugin.slo), files, a plot, a console table, the exit code.

Written once at test stop from the raw per-round records (merged across Locust workers), so the report
can always be re-derived from `records.csv`; the integration test checks exactly that.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from ampd_plugin import slo
from ampd_plugin.loadtest.session import LoadRecord

PERCENTILES = (50, 90, 95, 99)
RECORD_FIELDS = [f.name for f in fields(LoadRecord)]
EXIT_OK, EXIT_BELOW_TARGET, EXIT_NO_DATA = 0, 1, 2


def build_report(
    records: Sequence[LoadRecord], ttft_slo: float, itl_slo: float, slo_target: float, meta: dict | None = None
) -> dict:
    """Everything the console, the JSON file and the exit code need."""
    ok = [r for r in records if r.error is None]
    inf = math.inf
    by_session: dict[str, list[LoadRecord]] = {}
    for r in records:
        by_session.setdefault(r.session_id, []).append(r)
    report = {
        "meta": dict(meta or {}),
        "slo": {"ttft_s": ttft_slo, "itl_s": itl_slo, "target": slo_target},
        "summary": slo.summarize(records, ttft_slo, itl_slo),
        "ttft_only_attainment": slo.attainment(records, ttft_slo, inf),
        "itl_only_attainment": slo.attainment(records, inf, itl_slo),
        "attainment_by_round": {str(k): v for k, v in slo.attainment_by_round(records, ttft_slo, itl_slo).items()},
        "rounds_by_index": {str(k): sum(r.round_index == k for r in records) for k in sorted({r.round_index for r in records})},
        "sessions": len(by_session),
        "session_attainment": slo.session_attainment(records, ttft_slo, itl_slo),
        "per_session": {
            sid: {
                "rounds": len(rs),
                "met": all(slo.meets_slo(r, ttft_slo, itl_slo) for r in rs),
                "errors": sum(r.error is not None for r in rs),
            }
            for sid, rs in sorted(by_session.items())
        },
        "ttft_percentiles": {f"p{q}": slo.percentile((r.ttft for r in ok), q) for q in PERCENTILES},
        "itl_percentiles": {f"p{q}": slo.percentile((r.itl for r in ok), q) for q in PERCENTILES},
        "max_gap_percentiles": {f"p{q}": slo.percentile((r.max_gap for r in ok), q) for q in PERCENTILES},
        "output_tokens": int(sum(r.output_tokens for r in ok)),
        "late_starts": sum(r.late_start > 1.0 for r in records if r.round_index == 0),
        "errors_by_kind": _errors_by_kind(records),
    }
    report["passed"] = bool(records) and report["summary"]["slo_attainment"] >= slo_target
    report["exit_code"] = exit_code(report)
    return report


def add_router_kv_bytes(report: dict, before: float | None, after: float | None) -> None:
    """`report["router_kv_bytes_moved"]`: the router's own counter (its /metrics before/after the test).

    The router sends no per-round byte header, so the records' `kv_bytes` (and the summary, which is always
    re-derivable from the records) stay 0; the router's `ampd_router_kv_bytes_moved_total` is what it
    reports — its estimate for the whole test window (other traffic to the same router counts too). The
    source is recorded so a reader knows which figure they see."""
    if report["summary"]["kv_bytes_moved"]:
        report["router_kv_bytes_moved"] = None
        report["meta"]["kv_bytes_source"] = "x-ampd-kv-bytes response headers"
    elif before is not None and after is not None:
        report["router_kv_bytes_moved"] = int(max(0.0, after - before))
        report["meta"]["kv_bytes_source"] = "router /metrics ampd_router_kv_bytes_moved_total (router's estimate)"
    else:
        report["router_kv_bytes_moved"] = None
        report["meta"]["kv_bytes_source"] = "not reported by this server"


def exit_code(report: dict) -> int:
    """0 when attainment ≥ target; 1 below it; 2 when nothing was measured (a broken run is not a pass)."""
    if not report["summary"]["rounds"]:
        return EXIT_NO_DATA
    return EXIT_OK if report["summary"]["slo_attainment"] >= report["slo"]["target"] else EXIT_BELOW_TARGET


def _errors_by_kind(records: Sequence[LoadRecord]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            kind = r.error.split(":", 1)[0][:80]
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _clean(value):
    """JSON has no NaN/inf: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_records_csv(records: Sequence[LoadRecord], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        writer.writeheader()
        for r in sorted(records, key=lambda r: (r.start, r.session_id, r.round_index)):
            writer.writerow({k: ("" if v is None else v) for k, v in _clean(r.to_dict()).items()})


def read_records_csv(path: Path) -> list[LoadRecord]:
    """The inverse of write_records_csv (used to re-derive a report and by tests)."""
    types = {f.name: f.type for f in fields(LoadRecord)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for k, v in row.items():
                t = str(types[k])
                if v == "":
                    kw[k] = None if ("None" in t or k in ("ttft",)) else ("" if "str" in t else 0)
                elif "int" in t and "float" not in t:
                    kw[k] = int(v)
                elif "float" in t:
                    kw[k] = float(v)
                else:
                    kw[k] = v
            if kw.get("ttft") is None:
                kw["ttft"] = float("nan")
            out.append(LoadRecord(**kw))
    return out


def write_report(report: dict, records: Sequence[LoadRecord], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """report.json, records.csv, report.png in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "records.csv"}
    paths["json"].write_text(json.dumps(_clean(report), indent=2, sort_keys=False) + "\n")
    write_records_csv(records, paths["csv"])
    if plot and records:
        paths["png"] = out / "report.png"
        plot_report(report, records, paths["png"])
    return paths


def plot_report(report: dict, records: Sequence[LoadRecord], path: Path) -> None:
    """Attainment per round index, and TTFT/ITL distributions against their SLOs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    by_round = report["attainment_by_round"]
    axes[0].bar([int(k) for k in by_round], [100 * v for v in by_round.values()], color="tab:blue")
    axes[0].axhline(100 * report["slo"]["target"], color="tab:red", ls="--", label="target")
    axes[0].set(xlabel="round index (0 = first prefill)", ylabel="SLO attainment (%)", ylim=(0, 105),
                title=f"attainment {100 * report['summary']['slo_attainment']:.1f} % of {len(records)} rounds")
    axes[0].legend(loc="lower left")
    for ax, values, limit, name in (
        (axes[1], [r.ttft for r in ok], report["slo"]["ttft_s"], "TTFT"),
        (axes[2], [r.itl for r in ok if r.itl is not None], report["slo"]["itl_s"], "ITL (TPOT per round)"),
    ):
        if values:
            xs = sorted(values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], color="tab:blue")
        ax.axvline(limit, color="tab:red", ls="--", label=f"SLO {limit:g} s")
        ax.set(xlabel=f"{name} (s)", ylabel="CDF", title=name, ylim=(0, 1.02))
        ax.legend(loc="lower right")
    fig.suptitle(report["meta"].get("title", "ampd-plugin load test"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, scale=1.0, unit="", digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v * scale:.{digits}g}{unit}"


def print_report(report: dict, console=None) -> None:
    """A rich summary table on the console."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = report["summary"]
    t = Table(title=report["meta"].get("title", "ampd-plugin load test"), show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    verdict = "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]"
    t.add_row("SLO attainment (rounds)", f"{100 * s['slo_attainment']:.1f} %  (target {100 * report['slo']['target']:.0f} %, {verdict})")
    t.add_row("  TTFT-only / ITL-only", f"{100 * report['ttft_only_attainment']:.1f} % / {100 * report['itl_only_attainment']:.1f} %")
    t.add_row("session attainment", f"{100 * report['session_attainment']:.1f} %  of {report['sessions']} sessions")
    t.add_row("rounds / errors", f"{s['rounds']} / {s['errors']}")
    tp, ip = report["ttft_percentiles"], report["itl_percentiles"]
    t.add_row(f"TTFT p50 / p95 / p99 (SLO {report['slo']['ttft_s']:g} s)",
              " / ".join(_fmt(tp[k], 1000, " ms") for k in ("p50", "p95", "p99")))
    t.add_row(f"ITL p50 / p95 / p99 (SLO {report['slo']['itl_s']:g} s)",
              " / ".join(_fmt(ip[k], 1000, " ms") for k in ("p50", "p95", "p99")))
    t.add_row("longest token gap p95", _fmt(report["max_gap_percentiles"]["p95"], 1000, " ms"))
    t.add_row("attainment by round", "  ".join(f"r{k}:{100 * v:.0f}%" for k, v in report["attainment_by_round"].items()))
    kv = s["kv_bytes_moved"] or report.get("router_kv_bytes_moved")
    if s["local_fraction"] or kv:
        t.add_row("local prefill fraction", f"{100 * s['local_fraction']:.1f} %")
        t.add_row("KV bytes moved", f"{kv or 0:,} ({report['meta'].get('kv_bytes_source', '?')})")
    if report["late_starts"]:
        t.add_row("[yellow]sessions started > 1 s late[/]", str(report["late_starts"]))
    for kind, n in report["errors_by_kind"].items():
        t.add_row(f"[red]error[/] {kind}", str(n))
    console.print(t)


def plot_sweep(curve: Sequence[tuple[float, float]], goodput: float, target: float, path: Path, title: str = "") -> None:
    """Attainment versus session rate, with the target line and the goodput marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [x for x, _ in curve]
    ax.plot(xs, [100 * y for _, y in curve], "o-", color="tab:blue", label="SLO attainment")
    ax.axhline(100 * target, color="tab:red", ls="--", label=f"target {100 * target:.0f} %")
    if goodput > 0:
        ax.axvline(goodput, color="tab:green", ls=":", label=f"goodput {goodput:g} sessions/s")
    ax.set(xlabel="session rate (sessions/s)", ylabel="SLO attainment (%)", ylim=(0, 105), title=title or "rate sweep")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
