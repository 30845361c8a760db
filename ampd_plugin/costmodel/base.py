"""The cost-model contract every driver and policy types against, and its argument checks."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ampd_plugin.costmodel.layout import Layout

LINKS = ("net", "nvlink", "local")


class CostModel(ABC):
    """Predicts service times; the router uses it for decisions, the simulator for event times."""

    kv_bytes_per_token: int
    num_key_value_heads: int | None = None  # known KV heads (per-rank transfer pricing); None = even split

    @abstractmethod
    def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        """Seconds to prefill `l_incr` new tokens on top of `l_hist` cached tokens (≥ 1 token is computed)."""

    @abstractmethod
    def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float:
        """Seconds of one decode step of `batch` sequences reading `context_tokens` KV tokens in total."""

    @abstractmethod
    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        """Seconds to move the KV of `tokens` tokens from a `src` replica to a `dst` replica."""

    @abstractmethod
    def kv_capacity_tokens(self, layout: Layout) -> int:
        """KV tokens one replica can hold (0 when the weights do not fit)."""

    def kv_bytes(self, tokens: int) -> int:
        return int(tokens) * self.kv_bytes_per_token


def check_tokens(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def check_link(link: str) -> None:
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; expected one of {', '.join(LINKS)}")

