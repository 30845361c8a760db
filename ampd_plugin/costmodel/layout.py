"""The parallel layout of one engine replica, and which layouts the `ampd` connector can move KV between.

What the connector supports (the planner emits nothing else; `docs/connector.md` has the engine side):
- PP = 1 (no pipeline stages), no context parallelism;
- per replica, the KV heads split evenly over the TP ranks (`num_kv_heads % tp == 0`) or, when TP exceeds
  the KV heads, replicated evenly (`tp % num_kv_heads == 0`: each head on `tp / num_kv_heads` ranks);
- between a prefill and a decode replica, one TP degree divides the other (NIXL's and vLLM's Mooncake
  connector's heterogeneous-TP rule); the SGLang backend needs the same TP on both sides;
- attention-only models (no hybrid/SSM layers: those have state the connector does not move).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("vllm", "sglang")


@dataclass(frozen=True)
class Layout:
    """Parallel layout of one engine replica (tensor and pipeline parallel degree).

    `backend` is the engine the replica runs ("vllm" or "sglang"). It changes how a remote round is
    priced (`kv_pricing.remote_round_seconds`: SGLang's prefill worker recomputes the history instead of
    reading it), not what one prefill, decode step or transfer costs, so it is left out of equality and
    hashing: `Layout(2) == Layout(2, backend="sglang")`, and profiles keyed by layout answer both.
    """

    tp: int = 1
    pp: int = 1
    backend: str = field(default="vllm", compare=False)

    def __post_init__(self) -> None:
        if int(self.tp) < 1 or int(self.pp) < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")

    @property
    def devices(self) -> int:
        return self.tp * self.pp


def layout_refusal(num_kv_heads: int, layout: Layout) -> str | None:
    """Why the connector cannot serve one replica of this layout (None when it can)."""
    if layout.pp != 1:
        return f"PP={layout.pp}: the ampd connector moves KV of single-stage replicas only (use PP=1, larger TP)"
    tp, heads = layout.tp, int(num_kv_heads)
    if heads % tp and tp % heads:
        ok = sorted({d for d in range(1, heads + 1) if heads % d == 0} | {heads * k for k in (2, 4, 8)})
        return (f"TP={tp} with {heads} KV heads: the heads split neither evenly nor into even replicas "
                f"(use a TP that divides {heads} or a multiple of it: {', '.join(map(str, ok))})")
    return None


def pair_refusal(num_kv_heads: int, prefill: Layout, decode: Layout, backend: str = "vllm") -> str | None:
    """Why KV cannot move between a prefill and a decode replica of these layouts (None when it can)."""
    for side, layout in (("prefill", prefill), ("decode", decode)):
        why = layout_refusal(num_kv_heads, layout)
        if why:
            return f"{side} {why}"
    p, d = prefill.tp, decode.tp
    if backend == "sglang" and p != d:
        return f"prefill TP={p}, decode TP={d}: the SGLang ampd backend needs the same TP on both sides"
    if p % d and d % p:
        return f"prefill TP={p}, decode TP={d}: one TP degree must divide the other (e.g. {p} and {_divisor_pair(p, d)})"
    return None


def _divisor_pair(p: int, d: int) -> int:
    """The nearest decode TP to `d` that pairs with prefill TP `p`."""
    options = {k for k in range(1, p + 1) if p % k == 0} | {p * k for k in range(1, 9)}
    return min(options, key=lambda k: (abs(k - d), k))
