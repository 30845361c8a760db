"""What the simulator runs and returns: pools of replicas, a deployment, and a run's result."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ampd_plugin import slo
from ampd_plugin.costmodel import Layout

_POOL_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


@dataclass(frozen=True)
class Pool:
    """`count` replicas of one layout."""

    count: int
    layout: Layout = Layout()

    @property
    def gpus(self) -> int:
        return self.count * self.layout.devices

    def __str__(self) -> str:
        return f"{self.count}x{self.layout.tp}" + (f"x{self.layout.pp}pp" if self.layout.pp > 1 else "")


def parse_pool(text: str | int) -> Pool:
    """'N' or 'NxTP' (e.g. '2x4' = two replicas of TP 4); ValueError on anything else."""
    m = _POOL_RE.match(str(text))
    if not m:
        raise ValueError(f"bad pool {text!r}: expected N or NxTP, e.g. 2x4")
    count, tp = int(m.group(1)), int(m.group(2) or 1)
    if tp < 1:
        raise ValueError(f"bad pool {text!r}: TP degree must be >= 1")
    return Pool(count, Layout(tp=tp))


@dataclass(frozen=True)
class Deployment:
    """Prefill pool + decode pool. A co-located deployment has no prefill pool (count 0)."""

    prefill: Pool
    decode: Pool

    @classmethod
    def parse(cls, prefill: str | int, decode: str | int) -> "Deployment":
        return cls(parse_pool(prefill), parse_pool(decode))

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    def __str__(self) -> str:
        if self.prefill.count == 0:
            return f"D {self.decode} (co-located)"
        return f"P {self.prefill} + D {self.decode}"

    def to_dict(self) -> dict:
        return {
            "prefill": {"replicas": self.prefill.count, "tp": self.prefill.layout.tp, "pp": self.prefill.layout.pp},
            "decode": {"replicas": self.decode.count, "tp": self.decode.layout.tp, "pp": self.decode.layout.pp},
            "gpus": self.gpus,
        }


@dataclass
class SimResult:
    """What a run produced: one record per round, plus counters (events, evictions, ...)."""

    records: list[slo.RoundRecord]
    counters: dict[str, float]
    deployment: Deployment
    policy: str
    wall_s: float = 0.0

    @property
    def events(self) -> int:
        return int(self.counters["events"])

    def summary(self, ttft_slo: float, itl_slo: float) -> dict:
        """`slo.summarize` plus deployment, policy and counters (the `simulate --json` object)."""
        out = slo.summarize(self.records, ttft_slo, itl_slo)
        out.update(
            policy=self.policy,
            deployment=self.deployment.to_dict(),
            ttft_slo=ttft_slo,
            itl_slo=itl_slo,
            sessions=len({r.session_id for r in self.records}),
            evictions=int(self.counters["evictions"]),
            migrations=int(self.counters.get("migrations", 0)),
            events=self.events,
            simulated_s=self.counters["simulated_s"],
            wall_s=self.wall_s,
        )
        return out
