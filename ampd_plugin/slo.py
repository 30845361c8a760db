"""SLO arithmetic shared by the simulator, the load test and the demo: one definition of every metric.

A round is one prefill (initial or incremental) plus its decode. It meets the SLO only if its TTFT and
its ITL both do. ITL of a round is its TPOT, (t_last − t_first)/(n_out − 1): the mean gap between output
tokens after the first, which is what a streaming user experiences and what DistServe/AMPD report.
A session meets the SLO when all of its rounds do. Goodput is the highest load with attainment ≥ target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass
class RoundRecord:
    """One measured (or simulated) round."""

    session_id: str
    round_index: int
    ttft: float  # seconds from sending the request to the first non-empty token
    itl: float | None  # TPOT of the round in seconds; None when it produced fewer than two tokens
    input_tokens: int = 0
    output_tokens: int = 0
    route: str = ""  # "local", "remote", "" when unknown
    worker: str = ""
    kv_bytes: int = 0
    start: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tpot(t_first: float, t_last: float, n_out: int) -> float | None:
    """Time per output token after the first; None for fewer than two tokens."""
    if n_out < 2:
        return None
    return (t_last - t_first) / (n_out - 1)


def meets_slo(record: RoundRecord, ttft_slo: float, itl_slo: float) -> bool:
    """Both thresholds; a failed round never meets it; a round with one token is judged by TTFT alone."""
    if record.error is not None:
        return False
    if record.ttft > ttft_slo:
        return False
    return record.itl is None or record.itl <= itl_slo


def attainment(records: Sequence[RoundRecord], ttft_slo: float, itl_slo: float) -> float:
    """Share of rounds meeting both SLOs (0.0 for no rounds)."""
    if not records:
        return 0.0
    return sum(meets_slo(r, ttft_slo, itl_slo) for r in records) / len(records)


def session_attainment(records: Sequence[RoundRecord], ttft_slo: float, itl_slo: float) -> float:
    """Share of sessions all of whose rounds meet both SLOs."""
    by_session: dict[str, bool] = {}
    for r in records:
        by_session[r.session_id] = by_session.get(r.session_id, True) and meets_slo(r, ttft_slo, itl_slo)
    if not by_session:
        return 0.0
    return sum(by_session.values()) / len(by_session)


def attainment_by_round(records: Sequence[RoundRecord], ttft_slo: float, itl_slo: float) -> dict[int, float]:
    """Attainment per round index (round 0 = initial prefill)."""
    groups: dict[int, list[RoundRecord]] = {}
    for r in records:
        groups.setdefault(r.round_index, []).append(r)
    return {k: attainment(v, ttft_slo, itl_slo) for k, v in sorted(groups.items())}


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """q-th percentile (0..100) of the non-None values, linear interpolation; None when empty."""
    data = [v for v in values if v is not None]
    if not data:
        return None
    return float(np.percentile(np.asarray(data, dtype=float), q))


def summarize(records: Sequence[RoundRecord], ttft_slo: float, itl_slo: float) -> dict:
    """The standard summary printed by `simulate --json`, the load test and the demo."""
    ok = [r for r in records if r.error is None]
    routed = [r for r in ok if r.route]
    return {
        "rounds": len(records),
        "errors": len(records) - len(ok),
        "slo_attainment": attainment(records, ttft_slo, itl_slo),
        "session_attainment": session_attainment(records, ttft_slo, itl_slo),
        "ttft_p50": percentile((r.ttft for r in ok), 50),
        "ttft_p95": percentile((r.ttft for r in ok), 95),
        "itl_p50": percentile((r.itl for r in ok), 50),
        "itl_p95": percentile((r.itl for r in ok), 95),
        "local_fraction": (sum(r.route == "local" for r in routed) / len(routed)) if routed else 0.0,
        "kv_bytes_moved": int(sum(r.kv_bytes for r in records)),
    }


def goodput(curve: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """Highest load (e.g. session rate) whose attainment is ≥ target, from (load, attainment) points.

    DistServe's definition; 0.0 when no point reaches the target.
    """
    passing = [load for load, att in curve if att >= target]
    return max(passing) if passing else 0.0
