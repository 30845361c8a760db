"""The parallel layout of one engine replica: what every cost-model question is asked about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """Parallel layout of one engine replica (tensor and pipeline parallel degree)."""

    tp: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp
