"""Per-replica P95 latency as a function of parallel degree and load: the coefficients of the planner's ILP.

The AMPD paper's ILP uses τ(n), "the P95 latency of one replica of degree n", but leaves open how that
number depends on the load the replica carries. Here it is explicit: with capacity-weighted dispatch every
replica of a pool runs at the same utilisation ρ = λ / Σ_n x_n μ_n (μ_n = the replica's saturation round
rate), so a replica of degree n serves ρ·μ_n rounds/s and its P95 latency is τ(n, ρ). The ILP picks one
utilisation level ρ_l from a fixed grid (binary selection) and the replica counts that make it true.

Surrogates (cheap, monotone in load; the discrete-event simulator then checks the chosen candidates):
- prefill replica: M/G/1 — TTFT95 ≈ P95(service) + P95(wait) + P95(KV transfer), the wait tail taken as
  exponential with P(wait > 0) = ρ and the Pollaczek–Khinchine mean;
- decode replica: the batch size B solves B = r·E[n_out]·ITL(B) (Little's law), ITL95 = t_dec at the P95
  batch (B + 1.645·√B); its KV (sessions resident between rounds, Little's law again) must fit;
- co-located replica (the `colocated` policy): both, the decode steps stretched by the time spent prefilling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ampd_plugin.costmodel import Layout

# Utilisation levels ρ_l the ILP chooses from (finer near saturation, where latency moves fastest).
DEFAULT_RHO_GRID: tuple[float, ...] = tuple(
    sorted(set(np.round(np.concatenate([np.linspace(0.02, 0.8, 40), np.linspace(0.81, 0.99, 19)]), 4)))
)
Z95 = 1.645  # one-sided normal quantile used for the batch-size tail


@dataclass
class WorkloadStats:
    """What the planner needs to know about a multi-round workload, from a sample of its rounds.

    Arrays are aligned per sampled round: history already resident (l_hist), new tokens to prefill
    (l_incr), output tokens (n_out) and the tool/retrieval delay after the round (delay, seconds).
    """

    l_hist: np.ndarray
    l_incr: np.ndarray
    n_out: np.ndarray
    delay: np.ndarray
    rounds_per_session: float
    name: str = "workload"
    # Output tokens of the session's previous round (0 for a first round): what a prefill worker that served
    # that round lacks of the history on SGLang, whose prefill worker caches prompts only. None = all 0.
    prev_out: np.ndarray | None = None

    @classmethod
    def from_rounds(cls, rounds: Sequence[tuple[int, int, int, float]], sessions: int, name: str = "workload"):
        """From (l_hist, l_incr, n_out, delay) tuples of `sessions` sessions."""
        if not rounds or sessions <= 0:
            raise ValueError("the workload has no rounds")
        arr = np.asarray(rounds, dtype=float)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], len(rounds) / sessions, name)

    @classmethod
    def from_sessions(cls, sessions: Sequence, name: str = "workload") -> "WorkloadStats":
        """From `workload.Session`s: round k's history is everything before it (inputs and outputs)."""
        rounds, prev = [], []
        for s in sessions:
            hist, last_out = 0, 0
            for r in s.rounds:
                rounds.append((hist, r.input_tokens, r.output_tokens, r.tool_delay_s))
                prev.append(last_out)
                hist += r.input_tokens + r.output_tokens
                last_out = r.output_tokens
        stats = cls.from_rounds(rounds, len(sessions), name)
        stats.prev_out = np.asarray(prev, dtype=float)
        return stats

    @property
    def mean_out(self) -> float:
        return float(self.n_out.mean())

    @property
    def max_context(self) -> int:
        return int((self.l_hist + self.l_incr + self.n_out).max())


@dataclass
class PoolTable:
    """τ(n, ρ_l) (SLO-normalised) and μ_n for one pool; inf where a degree cannot run at that load."""

    kind: str  # "prefill", "decode" or "colocated"
    degrees: tuple[int, ...]
    rho: tuple[float, ...]
    mu: dict[int, float]  # saturation rate (rounds/s) of one replica of degree n; 0 = cannot run
    tau: dict[int, np.ndarray]  # normalised P95 latency per ρ level
    ttft95: dict[int, np.ndarray] = field(default_factory=dict)  # seconds, for reporting
    itl95: dict[int, np.ndarray] = field(default_factory=dict)
    kv_capacity: dict[int, int] = field(default_factory=dict)  # tokens per replica (decode pools)
    why_not: dict[int, str] = field(default_factory=dict)  # degree -> why it cannot serve

    def level_for(self, capacity: float, demand: float) -> int | None:
        """Index of the smallest grid level ρ_l ≥ demand/capacity (None: overloaded)."""
        if capacity <= 0:
            return None
        need = demand / capacity
        for i, r in enumerate(self.rho):
            if r >= need - 1e-12:
                return i
        return None


@dataclass
class Transfer:
    """How remote prefills move KV: the share of transfers that stay inside a node."""

    intra_node_fraction: float = 0.0


def _p95(values: np.ndarray) -> float:
    return float(np.percentile(values, 95)) if len(values) else 0.0


def _wait_p95(rho: float, mean_s: float, second_moment: float) -> float:
    """P95 of the M/G/1 waiting time: P(W>0)=ρ, exponential tail with the Pollaczek–Khinchine mean."""
    if rho >= 1.0:
        return math.inf
    if rho <= 0.05:
        return 0.0
    mean_wait = rho * second_moment / (2.0 * mean_s * (1.0 - rho))
    return (mean_wait / rho) * math.log(rho / 0.05)


class LatencyModel:
    """Builds the per-pool tables from a cost model, workload statistics and SLOs."""

    def __init__(self, cost_model, stats: WorkloadStats, ttft_slo: float, itl_slo: float,
                 transfer: Transfer | None = None, rho_grid: Sequence[float] = DEFAULT_RHO_GRID,
                 backend: str = "vllm"):
        if ttft_slo <= 0 or itl_slo <= 0:
            raise ValueError("SLOs must be positive")
        self.backend = backend
        self.cm = cost_model
        self.stats = stats
        self.ttft_slo = ttft_slo
        self.itl_slo = itl_slo
        self.transfer = transfer or Transfer()
        self.rho = tuple(float(r) for r in rho_grid)
        self._service: dict[int, np.ndarray] = {}
        self._xfer: dict[int, np.ndarray] = {}

    # ---- per-degree primitives -------------------------------------------------------------
    def capacity_tokens(self, n: int) -> int:
        return int(self.cm.kv_capacity_tokens(Layout(tp=n)))

    def prefill_service(self, n: int) -> np.ndarray:
        """Prefill time of every sampled round on a degree-n prefill replica.

        vLLM: the history is cached (read from the decode worker), the increment computed. SGLang
        (`kv_pricing.remote_round`): the prefill worker recomputes what its own cache lacks; the surrogate
        assumes it served the session's previous round (the router's locality), so it lacks that round's
        output; a cold prefill worker recomputes the whole history, which the simulator prices.
        """
        if n not in self._service:
            lay = Layout(tp=n, backend=self.backend)
            s = self.stats
            if self.backend == "sglang":
                prev = s.prev_out if s.prev_out is not None else np.zeros(len(s.l_hist))
                cached = np.maximum(0.0, s.l_hist - prev)
                rows = [(int(c), int(h + i - c)) for c, h, i in zip(cached, s.l_hist, s.l_incr)]
            else:
                rows = [(int(h), int(i)) for h, i in zip(s.l_hist, s.l_incr)]
            self._service[n] = np.array([self.cm.t_pre(c, i, lay) for c, i in rows], dtype=float)
        return self._service[n]

    def transfer_time(self, n_pre: int, n_dec: int) -> np.ndarray:
        """KV moved for a remote prefill, priced by the link crossed: history D→P (vLLM only; SGLang reads
        none) and increment P→D."""
        key = (n_pre, n_dec)
        if key not in self._xfer:
            src, dst = Layout(tp=n_dec), Layout(tp=n_pre)
            f = self.transfer.intra_node_fraction
            s = self.stats

            def cost(tokens: int) -> float:
                if tokens <= 0:
                    return 0.0
                fast = self.cm.t_kv(tokens, src, dst, link="nvlink") if f > 0 else 0.0
                slow = self.cm.t_kv(tokens, src, dst, link="net") if f < 1 else 0.0
                return f * fast + (1 - f) * slow

            reads_history = self.backend != "sglang"
            self._xfer[key] = np.array(
                [(cost(int(h)) if reads_history else 0.0) + cost(int(i)) for h, i in zip(s.l_hist, s.l_incr)],
                dtype=float,
            )
        return self._xfer[key]

    def decode_itl(self, n: int, rate: float, extra_busy: float = 0.0) -> tuple[float, float]:
        """(mean ITL, P95 ITL) of a degree-n decode replica serving `rate` rounds/s; inf if unstable.

        `extra_busy` is the share of time the replica spends on other work (co-located prefills).
        """
        lay = Layout(tp=n)
        s = self.stats
        ctx = float((s.l_hist + s.l_incr + s.n_out / 2.0).mean())  # mean context while decoding
        n_out = s.mean_out
        if extra_busy >= 1.0:
            return math.inf, math.inf

        def step(batch: float) -> float:
            b = max(1, int(math.ceil(batch)))
            return self.cm.t_dec(b, int(b * ctx), lay) / (1.0 - extra_busy)

        if rate <= 0:
            t = step(1)
            return t, t
        # Solve ITL = step(rate·n_out·ITL) by bisection on g(ITL) = step(...) - ITL (step grows sub-linearly
        # until saturation; no root means the replica cannot keep up).
        lo = step(1)
        hi = lo
        for _ in range(60):
            if step(rate * n_out * hi) <= hi:
                break
            hi *= 2.0
        else:
            return math.inf, math.inf
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if step(rate * n_out * mid) <= mid:
                hi = mid
            else:
                lo = mid
        itl = hi
        batch = rate * n_out * itl
        return itl, step(batch + Z95 * math.sqrt(max(batch, 1.0)))

    def resident_tokens(self, rate: float, itl: float) -> float:
        """KV tokens a decode replica holds at `rate` rounds/s: every session stays resident between rounds."""
        s = self.stats
        ctx = s.l_hist + s.l_incr + s.n_out
        hold = s.delay + s.n_out * itl
        return rate * float((hold * ctx).mean())

    # ---- pool tables ---------------------------------------------------------------------------
    def _saturation(self, feasible: Callable[[float], bool], upper: float) -> float:
        """Largest rate for which `feasible` holds (bisection; 0 if even a trickle fails)."""
        if not feasible(upper * 1e-6):
            return 0.0
        lo, hi = upper * 1e-6, upper
        while feasible(hi):
            lo, hi = hi, hi * 2.0
            if hi > upper * 1e6:
                return hi
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if feasible(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def prefill_table(self, degrees: Sequence[int], decode_degree_hint: int | None = None) -> PoolTable:
        mu, tau, ttft, why = {}, {}, {}, {}
        need = self.stats.max_context
        for n in degrees:
            capacity = self.capacity_tokens(n)
            if capacity < need:
                mu[n] = 0.0
                why[n] = (f"weights do not fit on {n} GPU(s)" if capacity <= 0 else
                          f"a degree-{n} replica holds {capacity} KV tokens, less than one {need}-token prompt")
                tau[n] = np.full(len(self.rho), np.inf)
                ttft[n] = tau[n]
                continue
            svc = self.prefill_service(n)
            xfer = self.transfer_time(n, decode_degree_hint or n)
            mean_s, m2 = float(svc.mean()), float((svc**2).mean())
            if mean_s <= 0:
                raise ValueError("cost model returned non-positive prefill times")
            mu[n] = 1.0 / mean_s
            base = _p95(svc) + _p95(xfer)
            t = np.array([base + _wait_p95(r, mean_s, m2) for r in self.rho])
            ttft[n] = t
            tau[n] = t / self.ttft_slo
        return PoolTable("prefill", tuple(degrees), self.rho, mu, tau, ttft95=ttft, why_not=why)

    def decode_table(self, degrees: Sequence[int]) -> PoolTable:
        return self._decode_like(degrees, colocated=False)

    def colocated_table(self, degrees: Sequence[int]) -> PoolTable:
        return self._decode_like(degrees, colocated=True)

    def _decode_like(self, degrees: Sequence[int], colocated: bool) -> PoolTable:
        mu, tau, ttft, itl, cap, why = {}, {}, {}, {}, {}, {}
        for n in degrees:
            capacity = self.capacity_tokens(n)
            cap[n] = capacity
            if capacity <= 0:
                mu[n] = 0.0
                why[n] = f"weights do not fit on {n} GPU(s)"
                tau[n] = np.full(len(self.rho), np.inf)
                continue
            svc = self.prefill_service(n) if colocated else None
            mean_s = float(svc.mean()) if colocated else 0.0
            m2 = float((svc**2).mean()) if colocated else 0.0

            def latency(rate: float) -> tuple[float, float]:
                busy = rate * mean_s
                mean_itl, itl95 = self.decode_itl(n, rate, extra_busy=busy)
                if not math.isfinite(itl95) or self.resident_tokens(rate, mean_itl) > capacity:
                    return math.inf, math.inf
                t95 = (_p95(svc) + _wait_p95(busy, mean_s, m2)) if colocated else 0.0
                return t95, itl95

            mu[n] = self._saturation(lambda r: math.isfinite(latency(r)[1]), upper=1.0)
            if mu[n] <= 0:
                why[n] = f"a degree-{n} replica cannot hold even one session's KV ({capacity} tokens)"
            t_row, i_row = [], []
            for r in self.rho:
                t95, i95 = latency(r * mu[n]) if mu[n] > 0 else (math.inf, math.inf)
                t_row.append(t95)
                i_row.append(i95)
            ttft[n], itl[n] = np.array(t_row), np.array(i_row)
            norm = itl[n] / self.itl_slo
            if colocated:
                norm = np.maximum(norm, ttft[n] / self.ttft_slo)
            tau[n] = norm
        kind = "colocated" if colocated else "decode"
        return PoolTable(kind, tuple(degrees), self.rho, mu, tau, ttft95=ttft, itl95=itl,
                         kv_capacity=cap, why_not=why)
