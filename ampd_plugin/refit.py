"""Online recalibration: refit a fitted cost model's constants to live (predicted, measured) observations.

Why: a profile is measured once; the hardware, engine version and load it runs under drift. A deployment
that compares what the cost model predicted for each prefill, decode step and KV transfer with what it then
measured can move the model's coefficients towards what it sees — within bounds, so one noisy window can
never turn the model into nonsense, and with a pull towards the current values, so a term the observations
do not exercise stays where it is.

Per (layout, term) group with at least `Bounds.min_samples` observations, each coefficient θ_j is written
as θ_j = s_j·u_j with s_j its current value (or, for a coefficient that is 0, the value at which its term
would explain a tenth of the median observation), and solved by bounded linear least squares
(scipy `lsq_linear`) on *relative* residuals (y_pred − y)/y plus prior rows √w·(u_j − u_j⁰), with
u_j ∈ [low, high] (a zero coefficient: [0, 1]). Transfers fit (latency, 1/bandwidth) of each link.
The result is a new `FittedCostModel` (the input is not modified) whose YAML is exactly what
`ampd-plugin profile` writes, with the refit's report appended under `meta.refit` (last 10 kept).
Pure: no I/O except `RefitResult.to_yaml(path)`, no clock.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal

import numpy as np

from ampd_plugin.costmodel import (DecodeCoefficients, FittedCostModel, Layout, LinkCoefficients,
                                   PrefillCoefficients)

log = logging.getLogger("ampd.costmodel.refit")

Kind = Literal["prefill", "decode", "transfer"]
MAX_HISTORY = 10


@dataclass(frozen=True)
class Observation:
    """One live measurement. `x`: prefill (l_hist, l_incr), decode (batch, context_tokens), transfer
    (tokens, 0). `predicted` is what the model said at the time (optional; recomputed when absent)."""

    kind: Kind
    x: tuple[int, int]
    measured: float
    layout: Layout = Layout()
    predicted: float | None = None
    link: str = "net"


@dataclass(frozen=True)
class Bounds:
    low: float = 0.5  # each coefficient stays within [low, high] × its current value
    high: float = 2.0
    prior_weight: float = 0.1  # pull towards the current value, relative to one observation
    min_samples: int = 5  # groups with fewer observations are left alone

    def __post_init__(self) -> None:
        if not 0 < self.low <= 1 <= self.high:
            raise ValueError(f"bounds need 0 < low <= 1 <= high, got low={self.low}, high={self.high}")
        if self.prior_weight < 0 or self.min_samples < 1:
            raise ValueError("prior_weight must be >= 0 and min_samples >= 1")


@dataclass
class RefitResult:
    model: FittedCostModel
    changes: list[dict] = field(default_factory=list)  # one entry per refitted group
    skipped: list[str] = field(default_factory=list)  # groups left alone, and why

    def to_yaml(self, path: Any = None) -> str:
        return self.model.to_yaml(path)


def _features(kind: Kind, x: tuple[int, int], bytes_per_token: int) -> list[float]:
    a, b = x
    if kind == "prefill":
        incr = max(int(b), 1)
        return [1.0, float(incr), incr * (a + incr / 2)]
    if kind == "decode":
        return [1.0, float(a), float(b)]
    return [1.0, float(a) * bytes_per_token]


def _coeffs(model: FittedCostModel, kind: Kind, layout: Layout, link: str) -> list[float]:
    if kind == "transfer":
        c = model.links[link]
        return [c.latency_s, 1.0 / c.bandwidth_bytes_per_s]
    lc = model.layouts[layout]
    c = lc.prefill if kind == "prefill" else lc.decode
    return [c.a, c.b, c.c]


def _solve(theta0: list[float], rows: np.ndarray, y: np.ndarray, bounds: Bounds) -> list[float]:
    from scipy.optimize import lsq_linear

    med_y = float(np.median(y))
    scale, lo, hi, u0 = [], [], [], []
    for j, t in enumerate(theta0):
        if t > 0:
            scale.append(t)
            lo.append(bounds.low)
            hi.append(bounds.high)
            u0.append(1.0)
        else:  # a zero term may grow until it explains a tenth of a typical observation
            f = float(np.median(rows[:, j]))
            scale.append(0.1 * med_y / f if f > 0 else 0.0)
            lo.append(0.0)
            hi.append(1.0 if f > 0 else 1e-12)
            u0.append(0.0)
    s = np.array(scale)
    a = rows * s / y[:, None]  # relative residuals: (Σ θ_j f_j − y) / y
    b = np.ones(len(y))
    w = math.sqrt(bounds.prior_weight)
    if w > 0:
        a = np.vstack([a, w * np.eye(len(s))])
        b = np.concatenate([b, w * np.array(u0)])
    u = lsq_linear(a, b, bounds=(np.array(lo), np.array(hi))).x
    return [float(ui * si) for ui, si in zip(u, s)]


def _mean_rel_error(theta: list[float], rows: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(rows @ np.array(theta) - y) / y))


def refit(model: FittedCostModel, observations: Iterable[Observation], bounds: Bounds = Bounds()) -> RefitResult:
    """A new model refitted to `observations`; see the module docstring for the method."""
    if not isinstance(model, FittedCostModel):
        raise ValueError("refit needs a fitted cost model (an `ampd-plugin profile` YAML), not "
                         f"{type(model).__name__}")
    groups: dict[tuple, list[Observation]] = {}
    dropped = 0
    for ob in observations:
        if ob.kind not in ("prefill", "decode", "transfer"):
            raise ValueError(f"unknown observation kind {ob.kind!r}")
        if not (isinstance(ob.measured, (int, float)) and math.isfinite(ob.measured) and ob.measured > 0):
            dropped += 1
            continue
        key = (ob.kind, ob.link) if ob.kind == "transfer" else (ob.kind, ob.layout)
        groups.setdefault(key, []).append(ob)
    new = copy.deepcopy(model)
    result = RefitResult(new)
    if dropped:
        result.skipped.append(f"{dropped} observation(s) with a non-positive or non-finite measurement dropped")
    for key, obs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        kind = key[0]
        layout = key[1] if kind != "transfer" else Layout()
        link = key[1] if kind == "transfer" else "net"
        label = f"{kind} {link}" if kind == "transfer" else f"{kind} tp={layout.tp},pp={layout.pp}"
        if (kind == "transfer" and link not in new.links) or (kind != "transfer" and layout not in new.layouts):
            result.skipped.append(f"{label}: not in the profile")
            continue
        if len(obs) < bounds.min_samples:
            result.skipped.append(f"{label}: {len(obs)} observation(s) < {bounds.min_samples}")
            continue
        rows = np.array([_features(kind, o.x, new.kv_bytes_per_token) for o in obs], dtype=float)
        y = np.array([o.measured for o in obs], dtype=float)
        before = _coeffs(new, kind, layout, link)
        after = _solve(before, rows, y, bounds)
        _store(new, kind, layout, link, after)
        change = {"term": label, "samples": len(obs), "before": before, "after": after,
                  "error_before": _mean_rel_error(before, rows, y), "error_after": _mean_rel_error(after, rows, y),
                  "predicted_median": statistics.median(o.predicted for o in obs if o.predicted is not None)
                  if any(o.predicted is not None for o in obs) else None,
                  "measured_median": float(np.median(y))}
        result.changes.append(change)
        log.info("refit %s on %d observations: %s -> %s (mean relative error %.1f%% -> %.1f%%)", label, len(obs),
                 _fmt(before), _fmt(after), 100 * change["error_before"], 100 * change["error_after"])
    history = list(new.meta.get("refit", []))[-(MAX_HISTORY - 1):]
    history.append({"bounds": [bounds.low, bounds.high], "changes": [
        {k: v for k, v in c.items() if k in ("term", "samples", "before", "after", "error_before", "error_after")}
        for c in result.changes], "skipped": list(result.skipped)})
    new.meta = {**new.meta, "refit": history}
    return result


def _store(model: FittedCostModel, kind: Kind, layout: Layout, link: str, theta: list[float]) -> None:
    if kind == "transfer":
        latency, inv_bw = theta
        old = model.links[link]
        bw = 1.0 / inv_bw if inv_bw > 0 else old.bandwidth_bytes_per_s
        model.links = {**model.links, link: LinkCoefficients(latency, bw)}
        return
    lc = model.layouts[layout]
    if kind == "prefill":
        lc = replace(lc, prefill=PrefillCoefficients(*theta))
    else:
        lc = replace(lc, decode=DecodeCoefficients(*theta))
    model.layouts = {**model.layouts, layout: lc}


def _fmt(theta: list[float]) -> str:
    return "(" + ", ".join(f"{t:.4g}" for t in theta) + ")"
