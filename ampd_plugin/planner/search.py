"""Allocation search: the AMPD paper's integer program, written out, solved with HiGHS (scipy.optimize.milp).

Decision, per pool p ∈ {prefill, decode} and degree n ∈ degrees:
    x[p,n] ∈ Z≥0   replicas of degree n               a[p,n] ∈ {0,1}  "degree n is used in pool p"
    u[p,l] ∈ {0,1} "pool p runs at utilisation level ρ_l"              Z ≥ 0  the bottleneck
minimise  Z + w·Σ_p Z_p + ε·GPUs/N        (Z ≥ Z_p; the small w = 1e-3 balances the non-bottleneck pool,
                                          ε = 1e-4 prefers fewer GPUs between equal plans)
s.t.  a[p,n] ≤ x[p,n] ≤ ⌊N/n⌋·a[p,n]                      (activation: a=1 ⇔ x≥1)
      Σ_n a[p,n] ≥ 1   (= 1 when pools are homogeneous)   (every pool exists; one degree per pool)
      a[prefill,n] = a[decode,n]   when the engine needs equal TP on both sides (SGLang PD)
      a[prefill,n] + a[decode,m] ≤ 1  when neither of n, m divides the other (the connector cannot map them)
      Σ_l u[p,l] = 1                                      (one load level per pool)
      Σ_n μ[p,n]·x[p,n] ≥ Σ_l (λ/ρ_l)·u[p,l]              (per-replica load: ρ ≤ ρ_l, i.e. load ∝ 1/replicas)
      Z_p ≥ τ[p](n,ρ_l) − M·(2 − a[p,n] − u[p,l]) ∀ n,l   (the paper's conditional C1/C2, big-M)
      a[p,n] + u[p,l] ≤ 1   where τ = ∞                   (degree n cannot run at that load)
      Σ_{p,n} n·x[p,n] ≤ N                                (C3, GPU budget)
      Σ_n cap[n]·x[decode,n] ≥ resident session KV        (memory)
Degrees the connector cannot serve (KV heads neither divisible by TP nor dividing it, hybrid/SSM models
in a PD plan; `costmodel.layout`) are left out before the program is built.
τ is SLO-normalised (P95 TTFT / TTFT SLO for prefill, P95 ITL / ITL SLO for decode) so the two pools
compete on one scale and Z ≤ 1 means the surrogate predicts both SLOs met. The top K allocations come
from re-solving with a no-good cut on the previous solutions. Then each candidate is placed on nodes
(`placement`) and, when a simulator is given, simulated as a whole deployment under the policy over a
rate sweep, giving SLO attainment and goodput (`slo.goodput`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ampd_plugin import slo
from ampd_plugin.costmodel import BACKENDS, Layout, ModelSpec, layout_refusal, pair_refusal
from ampd_plugin.planner.latency_tables import LatencyModel, PoolTable, Transfer, WorkloadStats
from ampd_plugin.planner.placement import Placement, place

GPU_TIE_BREAK = 1e-4  # prefer fewer GPUs only between equally good bottlenecks
POOL_BALANCE = 1e-3  # weight of the per-pool bottlenecks: keeps the non-critical pool out of saturation


class PlanInfeasible(ValueError):
    """No allocation can serve the workload; the message says why and what would help."""


@dataclass
class Candidate:
    """One allocation: replicas per degree for each pool, its predicted bottleneck and later its checks."""

    prefill: dict[int, int]
    decode: dict[int, int]
    objective: float  # the ILP's Z (SLO-normalised worst per-replica P95; ≤ 1 predicts SLOs met)
    predicted: dict = field(default_factory=dict)  # per pool: level ρ, P95 TTFT/ITL per degree
    placement: Placement | None = None
    simulated: dict | None = None  # summary at the target rate (slo.summarize keys)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)
    goodput: float | None = None
    goodput_capped: bool = False  # the highest simulated rate still met the target: goodput is a lower bound
    score: float = math.inf  # the ILP's full objective (bottleneck + balance + GPU tie-break)

    @property
    def gpus(self) -> int:
        return sum(n * k for n, k in self.prefill.items()) + sum(n * k for n, k in self.decode.items())

    def label(self) -> str:
        def pool(counts: dict[int, int]) -> str:
            parts = [f"{k}xTP{n}" for n, k in sorted(counts.items()) if k]
            return "+".join(parts) or "-"

        return f"P[{pool(self.prefill)}] D[{pool(self.decode)}]"

    def to_dict(self) -> dict:
        return {
            "label": self.label(),
            "prefill": {str(n): k for n, k in sorted(self.prefill.items()) if k},
            "decode": {str(n): k for n, k in sorted(self.decode.items()) if k},
            "gpus": self.gpus,
            "objective": _finite(self.objective),
            "predicted": self.predicted,
            "placement": self.placement.to_dict() if self.placement else None,
            "simulated": self.simulated,
            "curve": [[r, a] for r, a in self.curve],
            "goodput": self.goodput,
            "goodput_capped": self.goodput_capped,
        }


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass
class PlanRequest:
    """Everything `plan` decides from (the CLI builds it; tests build it directly)."""

    cost_model: object
    stats: WorkloadStats
    rate: float  # sessions per second
    ttft_slo: float
    itl_slo: float
    gpus: int
    degrees: tuple[int, ...] = (1, 2, 4, 8)
    gpus_per_node: int = 8
    policy: str = "ampd"
    top_k: int = 3
    homogeneous: bool = True  # one degree per pool (what engines' PD routers and the simulator run)
    same_tp: bool = False  # prefill and decode must use the same TP degree (SGLang non-wide-EP PD)
    engine: str = "vllm"  # what the workers run: prices remote rounds (kv_pricing.remote_round), SGLang ⇒ same_tp

    def __post_init__(self) -> None:
        if self.engine not in BACKENDS:
            raise ValueError(f"--engine must be one of {', '.join(BACKENDS)}, not {self.engine!r}")
        if self.engine == "sglang":
            self.same_tp = True
        if self.rate <= 0:
            raise ValueError("--rate must be positive")
        if self.gpus <= 0:
            raise ValueError("--gpus must be positive")
        if self.gpus_per_node <= 0:
            raise ValueError("--gpus-per-node must be positive")
        if not self.degrees or any(int(n) <= 0 for n in self.degrees):
            raise ValueError("--degrees must be positive integers")
        self.degrees = tuple(sorted({int(n) for n in self.degrees}))

    @property
    def round_rate(self) -> float:
        return self.rate * self.stats.rounds_per_session

    @property
    def has_prefill_pool(self) -> bool:
        return self.policy != "colocated"


# ------------------------------------------------------------------------------------------ tables
def default_intra_node_fraction(gpus: int, gpus_per_node: int) -> float:
    """Share of remote-prefill KV transfers staying in a node when prefill workers are picked at random
    from a balanced placement: one node → all of them, otherwise about 1/nodes."""
    nodes = max(1, math.ceil(gpus / gpus_per_node))
    return 1.0 if nodes == 1 else 1.0 / nodes


def model_spec_of(cost_model) -> ModelSpec | None:
    """The architecture behind a cost model (roofline, fitted over a roofline, link-priced), if known."""
    seen = 0
    while cost_model is not None and seen < 8:
        spec = getattr(cost_model, "model", None)
        if isinstance(spec, ModelSpec):
            return spec
        cost_model = getattr(cost_model, "base", None) or getattr(cost_model, "fallback", None)
        seen += 1
    return None


def kv_heads_of(cost_model) -> int | None:
    spec = model_spec_of(cost_model)
    return spec.num_key_value_heads if spec else getattr(cost_model, "num_key_value_heads", None)


def served_degrees(req: PlanRequest) -> tuple[list[int], list[str]]:
    """Degrees that fit a node and the budget and that the engines and connector can run, and why the
    others cannot (PlanInfeasible when none is left, or when the model cannot be served disaggregated)."""
    spec = model_spec_of(req.cost_model)
    if spec is not None and spec.hybrid and req.has_prefill_pool:
        raise PlanInfeasible(
            f"model {spec.name!r} cannot be served disaggregated: {spec.hybrid}; the ampd connector moves "
            f"plain attention KV only (hybrid/SSM state is not transferred). Plan it co-located "
            f"(--policy colocated) or use an attention-only model."
        )
    heads = kv_heads_of(req.cost_model)
    degrees, dropped = [], []
    for n in req.degrees:
        if n > min(req.gpus, req.gpus_per_node):
            continue
        why = layout_refusal(heads, Layout(tp=n)) if heads else None
        if why:
            dropped.append(why)
        else:
            degrees.append(n)
    if not degrees:
        reasons = ("; ".join(dropped) + ". ") if dropped else ""
        raise PlanInfeasible(
            f"no parallel degree in {list(req.degrees)} can serve the model: {reasons}"
            f"{req.gpus} GPU(s), {req.gpus_per_node} per node (tensor parallelism stays inside a node)"
        )
    return degrees, dropped


def pair_ok(req: PlanRequest, n_pre: int, n_dec: int) -> bool:
    """Whether KV can move between a TP-n_pre prefill and a TP-n_dec decode replica (one divides the other;
    SGLang: equal)."""
    heads = kv_heads_of(req.cost_model) or math.lcm(n_pre, n_dec)
    return pair_refusal(heads, Layout(tp=n_pre), Layout(tp=n_dec), req.engine) is None


def build_tables(req: PlanRequest, intra_node_fraction: float | None = None) -> list[PoolTable]:
    """The τ(n, ρ) tables of the pools the policy needs (degrees wider than a node, or that the connector
    cannot serve, are excluded)."""
    f = default_intra_node_fraction(req.gpus, req.gpus_per_node) if intra_node_fraction is None else intra_node_fraction
    model = LatencyModel(req.cost_model, req.stats, req.ttft_slo, req.itl_slo, Transfer(f), backend=req.engine)
    degrees, _ = served_degrees(req)
    if req.has_prefill_pool:
        return [model.prefill_table(degrees), model.decode_table(degrees)]
    return [model.colocated_table(degrees)]


# ------------------------------------------------------------------------------------------ the ILP
@dataclass
class _Var:
    pool: int
    kind: str  # "x", "a", "u", "z", "cut"
    n: int = 0
    level: int = 0


class _Program:
    """Builds the ILP as dense rows for scipy.optimize.milp."""

    def __init__(self) -> None:
        self.vars: list[_Var] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[dict[int, float]] = []
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []

    def var(self, v: _Var, lb: float, ub: float, integer: bool) -> int:
        self.vars.append(v)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.vars) - 1

    def row(self, coeffs: dict[int, float], lb: float, ub: float) -> None:
        self.rows.append(coeffs)
        self.row_lb.append(lb)
        self.row_ub.append(ub)

    def solve(self, objective: dict[int, float], time_limit: float):
        nvar = len(self.vars)
        c = np.zeros(nvar)
        for i, v in objective.items():
            c[i] = v
        A = np.zeros((len(self.rows), nvar))
        for r, coeffs in enumerate(self.rows):
            for i, v in coeffs.items():
                A[r, i] = v
        return milp(
            c,
            constraints=LinearConstraint(A, self.row_lb, self.row_ub),
            integrality=np.array(self.integer),
            bounds=Bounds(self.lb, self.ub),
            options={"time_limit": time_limit, "presolve": True},
        )


def _demand(req: PlanRequest) -> float:
    return req.round_rate


def resident_tokens(req: PlanRequest) -> float:
    """KV tokens all sessions keep resident on the decode pool (ITL taken at its SLO)."""
    model = LatencyModel(req.cost_model, req.stats, req.ttft_slo, req.itl_slo)
    return model.resident_tokens(req.round_rate, req.itl_slo)


def solve_ilp(req: PlanRequest, tables: Sequence[PoolTable], exclude: Sequence[Candidate] = (),
              time_limit: float = 30.0) -> Candidate | None:
    """One optimal allocation not in `exclude`; None when no (further) allocation is feasible."""
    prog = _Program()
    N = req.gpus
    demand = _demand(req)
    finite = [t for tab in tables for row in tab.tau.values() for t in row if math.isfinite(t)]
    big_m = (max(finite) if finite else 1.0) + 1.0
    z = prog.var(_Var(-1, "z"), 0.0, big_m, False)
    x_of: dict[tuple[int, int], int] = {}
    gpu_row: dict[int, float] = {}
    zp_idx = []
    a_of: list[dict[int, int]] = []
    for p, tab in enumerate(tables):
        a_idx, u_idx = {}, {}
        zp = prog.var(_Var(p, "zp"), 0.0, big_m, False)
        zp_idx.append(zp)
        prog.row({z: 1.0, zp: -1.0}, 0.0, np.inf)
        for n in tab.degrees:
            usable = tab.mu.get(n, 0.0) > 0 and n <= N
            ub = N // n if usable else 0
            x = prog.var(_Var(p, "x", n), 0, ub, True)
            a = prog.var(_Var(p, "a", n), 0, 1 if usable else 0, True)
            x_of[(p, n)] = x
            a_idx[n] = a
            prog.row({x: 1.0, a: -float(max(ub, 1))}, -np.inf, 0.0)  # x ≤ ub·a
            prog.row({x: 1.0, a: -1.0}, 0.0, np.inf)  # x ≥ a
            gpu_row[x] = float(n)
        for l, rho in enumerate(tab.rho):
            u_idx[l] = prog.var(_Var(p, "u", level=l), 0, 1, True)
        prog.row({a: 1.0 for a in a_idx.values()}, 1.0, 1.0 if req.homogeneous else np.inf)
        a_of.append(a_idx)
        prog.row({u: 1.0 for u in u_idx.values()}, 1.0, 1.0)
        cap = {x_of[(p, n)]: tab.mu.get(n, 0.0) for n in tab.degrees}
        cap.update({u_idx[l]: -demand / rho for l, rho in enumerate(tab.rho)})
        prog.row(cap, 0.0, np.inf)
        for n in tab.degrees:
            for l in range(len(tab.rho)):
                t = float(tab.tau[n][l])
                if math.isfinite(t):
                    prog.row({zp: 1.0, a_idx[n]: -big_m, u_idx[l]: -big_m}, t - 2 * big_m, np.inf)
                else:
                    prog.row({a_idx[n]: 1.0, u_idx[l]: 1.0}, -np.inf, 1.0)
        if tab.kind in ("decode", "colocated"):
            need = resident_tokens(req)
            prog.row({x_of[(p, n)]: float(tab.kv_capacity.get(n, 0)) for n in tab.degrees}, need, np.inf)
    prog.row(gpu_row, -np.inf, float(N))
    if req.same_tp and len(tables) == 2:
        for n in tables[0].degrees:
            prog.row({a_of[0][n]: 1.0, a_of[1][n]: -1.0}, 0.0, 0.0)
    if len(tables) == 2:  # the connector moves KV only between degrees where one divides the other
        for n in tables[0].degrees:
            for m in tables[1].degrees:
                if not pair_ok(req, n, m):
                    prog.row({a_of[0][n]: 1.0, a_of[1][m]: 1.0}, -np.inf, 1.0)
    for prev in exclude:
        _no_good_cut(prog, tables, x_of, prev, N)
    objective = {z: 1.0}
    objective.update({zp: POOL_BALANCE for zp in zp_idx})
    objective.update({x: GPU_TIE_BREAK * w / N for x, w in gpu_row.items()})
    res = prog.solve(objective, time_limit)
    if res.x is None or res.status not in (0, 1):
        return None
    sol = np.round(res.x).astype(int)
    counts = [{n: int(sol[x_of[(p, n)]]) for n in tab.degrees} for p, tab in enumerate(tables)]
    prefill, decode = (counts[0], counts[1]) if len(tables) == 2 else ({}, counts[0])
    cand = Candidate(prefill=prefill, decode=decode, objective=float(res.x[z]))
    cand.objective, cand.predicted = evaluate(req, tables, cand)
    cand.score = score(req, cand, cand.predicted, cand.objective)
    return cand


def _no_good_cut(prog: _Program, tables, x_of, prev: Candidate, N: int) -> None:
    """Forbid exactly `prev`: some x must move up by one or down by one (big-M, two binaries per x)."""
    pools = [prev.prefill, prev.decode] if len(tables) == 2 else [prev.decode]
    flips = {}
    for p, tab in enumerate(tables):
        for n in tab.degrees:
            x = x_of[(p, n)]
            v = pools[p].get(n, 0)
            ub = prog.ub[x]
            if v + 1 <= ub:
                b = prog.var(_Var(p, "cut", n), 0, 1, True)
                prog.row({x: 1.0, b: -float(v + 1)}, 0.0, np.inf)  # b=1 ⇒ x ≥ v+1
                flips[b] = 1.0
            if v >= 1:
                b = prog.var(_Var(p, "cut", n), 0, 1, True)
                prog.row({x: 1.0, b: float(ub - v + 1)}, -np.inf, float(ub))  # b=1 ⇒ x ≤ v−1
                flips[b] = 1.0
    prog.row(flips, 1.0, np.inf)


def evaluate(req: PlanRequest, tables: Sequence[PoolTable], cand: Candidate) -> tuple[float, dict]:
    """The ILP's objective for a fixed allocation (same discretisation), plus per-pool detail."""
    pools = [cand.prefill, cand.decode] if len(tables) == 2 else [cand.decode]
    if cand.gpus > req.gpus:
        return math.inf, {}
    actives = [sorted(n for n, k in counts.items() if k > 0) for counts in pools]
    if req.homogeneous and any(len(a) > 1 for a in actives):
        return math.inf, {}
    if req.same_tp and len(actives) == 2 and actives[0] != actives[1]:
        return math.inf, {}
    if len(actives) == 2 and not all(pair_ok(req, n, m) for n in actives[0] for m in actives[1]):
        return math.inf, {}
    demand = _demand(req)
    worst = 0.0
    detail = {}
    for tab, counts in zip(tables, pools):
        active = [n for n, k in counts.items() if k > 0]
        if not active:
            return math.inf, {}
        capacity = sum(tab.mu.get(n, 0.0) * k for n, k in counts.items())
        level = tab.level_for(capacity, demand)
        if level is None:
            return math.inf, {}
        entry = {"utilisation": tab.rho[level], "bottleneck": 0.0, "per_degree": {}}
        for n in active:
            t = float(tab.tau[n][level])
            worst = max(worst, t)
            entry["bottleneck"] = max(entry["bottleneck"], t)
            per = {"tau": _finite(t)}
            if n in tab.ttft95 and tab.kind != "decode":
                per["ttft_p95"] = _finite(float(tab.ttft95[n][level]))
            if n in tab.itl95:
                per["itl_p95"] = _finite(float(tab.itl95[n][level]))
            entry["per_degree"][str(n)] = per
        if tab.kind in ("decode", "colocated"):
            held = sum(tab.kv_capacity.get(n, 0) * k for n, k in counts.items())
            if held < resident_tokens(req):
                return math.inf, {}
        detail[tab.kind] = entry
    return worst, detail


def score(req: PlanRequest, cand: Candidate, detail: dict, worst: float) -> float:
    """The ILP objective of an evaluated allocation (what brute force must also minimise)."""
    if not math.isfinite(worst):
        return math.inf
    pools = sum(entry["bottleneck"] for entry in detail.values())
    return worst + POOL_BALANCE * pools + GPU_TIE_BREAK * cand.gpus / req.gpus


# ------------------------------------------------------------------------------------------ diagnosis
def _idle_floor_violations(tables: Sequence[PoolTable]) -> list[str]:
    """Pools whose SLO fails even at the lowest load on their best degree (no budget can fix that)."""
    out = []
    for tab in tables:
        usable = [n for n in tab.degrees if tab.mu.get(n, 0.0) > 0]
        if usable and min(float(tab.tau[n][0]) for n in usable) > 1.0:
            out.append(tab.kind)
    return out


def explain_infeasible(req: PlanRequest, tables: Sequence[PoolTable]) -> str:
    """Why no allocation exists: weights, a single request's latency, or the budget."""
    lines = []
    for tab in tables:
        usable = [n for n in tab.degrees if tab.mu.get(n, 0.0) > 0]
        if not usable:
            reasons = "; ".join(f"TP{n}: {tab.why_not.get(n, 'cannot serve')}" for n in tab.degrees)
            lines.append(f"the {tab.kind} pool has no usable degree ({reasons}). "
                         f"Try larger --degrees, more memory per GPU or a smaller model.")
            continue
        floor = min(float(tab.tau[n][0]) for n in usable)
        if floor > 1.0:
            slo_name = "TTFT" if tab.kind == "prefill" else ("ITL" if tab.kind == "decode" else "TTFT/ITL")
            best = min(usable, key=lambda n: float(tab.tau[n][0]))
            lines.append(
                f"the {slo_name} SLO is impossible at any allocation: even a nearly idle {tab.kind} replica on its "
                f"best degree (TP{best}) reaches {floor:.2f}× the SLO at P95 (the workload's long rounds alone take "
                f"that long). Relax the SLO, use faster GPUs or allow larger --degrees."
            )
    if not lines:
        need = 0
        demand = _demand(req)
        for tab in tables:
            best = min(n * math.ceil(demand / (tab.rho[-1] * tab.mu[n])) for n in tab.degrees if tab.mu.get(n, 0) > 0)
            need += best
        if need > req.gpus:
            lines.append(f"at {req.rate:g} sessions/s ({demand:.2f} rounds/s) the pools need at least {need} GPUs "
                         f"to stay below saturation; the budget is {req.gpus}. Lower --rate or raise --gpus.")
        else:
            lines.append(f"no allocation of {req.gpus} GPUs satisfies the memory constraint "
                         f"({resident_tokens(req):.0f} resident KV tokens) together with the load.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ top level
Simulator = Callable[[Candidate, float], dict]
"""(candidate, session rate) -> slo.summarize() dict of the whole deployment under the policy."""


@dataclass
class PlanResult:
    request: PlanRequest
    candidates: list[Candidate]
    solve_seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        r = self.request
        return {
            "rate": r.rate,
            "gpus": r.gpus,
            "gpus_per_node": r.gpus_per_node,
            "degrees": list(r.degrees),
            "policy": r.policy,
            "ttft_slo": r.ttft_slo,
            "itl_slo": r.itl_slo,
            "workload": r.stats.name,
            "solve_seconds": round(self.solve_seconds, 4),
            "warnings": list(self.warnings),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def search(req: PlanRequest, simulator: Simulator | None = None, rate_factors: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
           progress: Callable[[str], None] | None = None) -> PlanResult:
    """ILP top-K → placement → (optional) simulation over a rate sweep; ranked best first."""
    t0 = time.perf_counter()
    tables = build_tables(req)
    impossible = _idle_floor_violations(tables)
    if impossible:
        raise PlanInfeasible(explain_infeasible(req, tables))
    candidates: list[Candidate] = []
    for _ in range(max(1, req.top_k)):
        cand = solve_ilp(req, tables, exclude=candidates)
        if cand is None:
            break
        candidates.append(cand)
    solve_s = time.perf_counter() - t0
    if not candidates:
        raise PlanInfeasible(explain_infeasible(req, tables))
    warnings = [f"degree left out: {why}" for why in served_degrees(req)[1]]
    for cand in candidates:
        cand.placement = place(cand, req.gpus, req.gpus_per_node)
        if cand.placement.intra_node_fraction != default_intra_node_fraction(req.gpus, req.gpus_per_node) \
                and req.has_prefill_pool:
            priced = build_tables(req, intra_node_fraction=cand.placement.intra_node_fraction)
            cand.objective, cand.predicted = evaluate(req, priced, cand)
            cand.score = score(req, cand, cand.predicted, cand.objective)
    if simulator is not None:
        for i, cand in enumerate(candidates):
            for f in rate_factors:
                rate = req.rate * f
                if progress:
                    progress(f"simulating {cand.label()} at {rate:.3g} sessions/s")
                summary = simulator(cand, rate)
                cand.curve.append((rate, float(summary["slo_attainment"])))
                if abs(f - 1.0) < 1e-9:
                    cand.simulated = summary
            cand.goodput = slo.goodput(cand.curve)
            cand.goodput_capped = bool(cand.curve) and cand.goodput == max(r for r, _ in cand.curve)
        candidates.sort(key=lambda c: (-(c.simulated or {}).get("slo_attainment", 0.0), -(c.goodput or 0.0),
                                       c.objective, c.gpus))
    best = candidates[0]
    if best.objective > 1.0:
        text = (f"the ILP's surrogate predicts no allocation of {req.gpus} GPUs meets both SLOs at {req.rate:g} "
                f"sessions/s (best bottleneck P95 = {best.objective:.2f}× its SLO)")
        att = (best.simulated or {}).get("slo_attainment")
        if att is not None:
            text += f"; the simulation of the best candidate gives {att:.1%} SLO attainment"
        warnings.append(text + ". More GPUs, a lower rate or looser SLOs would help.")
    return PlanResult(req, candidates, solve_s, warnings)
