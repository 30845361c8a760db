"""Least-squares fits of the fitted model's coefficients to measurements (`ampd-plugin profile`)."""

from __future__ import annotations

from typing import Sequence

from ampd_plugin.costmodel.fitted import DecodeCoefficients, LinkCoefficients, PrefillCoefficients


def nonnegative_least_squares(rows: Sequence[Sequence[float]], y: Sequence[float], what: str,
                              min_samples: int) -> list[float]:
    """Coefficients x ≥ 0 minimising |rows·x − y| (every term of these models is a cost, never a gain)."""
    import numpy as np
    from scipy.optimize import nnls

    if len(y) < min_samples:
        raise ValueError(f"{what} needs at least {min_samples} samples")
    return [float(v) for v in nnls(np.array(rows, dtype=float), np.array(y, dtype=float))[0]]


def fit_prefill(samples: Sequence[tuple[int, int, float]]) -> PrefillCoefficients:
    """`PrefillCoefficients` fitted to (l_hist, l_incr, seconds) measurements."""
    rows = [[1.0, l_incr, l_incr * (l_hist + l_incr / 2)] for l_hist, l_incr, _ in samples]
    return PrefillCoefficients(*nonnegative_least_squares(rows, [s[2] for s in samples], "fit_prefill", 3))


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> DecodeCoefficients:
    """`DecodeCoefficients` fitted to (batch, context_tokens, seconds) measurements."""
    rows = [[1.0, batch, ctx] for batch, ctx, _ in samples]
    return DecodeCoefficients(*nonnegative_least_squares(rows, [s[2] for s in samples], "fit_decode", 3))


def fit_link(samples: Sequence[tuple[int, float]], kv_bytes_per_token: int) -> LinkCoefficients:
    """`LinkCoefficients` fitted to (tokens, seconds) KV-transfer measurements."""
    rows = [[1.0, tokens * kv_bytes_per_token] for tokens, _ in samples]
    latency, inv_bw = nonnegative_least_squares(rows, [s for _, s in samples], "fit_link", 1)
    if inv_bw <= 0:
        raise ValueError("KV transfer times did not grow with size; cannot fit a bandwidth")
    return LinkCoefficients(latency, 1.0 / inv_bw)
