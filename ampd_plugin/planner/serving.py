"""The serving path's terms the simulator needs beyond the model's forward passes.

Why: what a user sees is not only prefill and decode compute. Every round also pays the router hop, the
engine API server's front end (HTTP parsing, tokenisation: one FIFO server per worker), and a remote
round pays a second HTTP call (P answers the router, then the router calls D) plus, when P reads history,
the decode worker's export round trip. vLLM V1 also schedules by a token budget per step
(`max_num_batched_tokens`): prefills are chunked into steps shared with the running decode batch.

`ampd-plugin profile` measures these (directly and through the router) and stores them under the profile's
`serving:` key; a roofline model (no profile) gets the GPU defaults below. Everything is in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

# vLLM V1's default `max_num_batched_tokens` for its OpenAI server: 2048 × world size on CPU, 8192 on a
# GPU with ≥ 70 GB (H100/H20/H200), 2048 on smaller GPUs (vllm/engine/arg_utils.py).
CPU_TOKEN_BUDGET = 2048
GPU_TOKEN_BUDGET = 8192


@dataclass(frozen=True)
class ServingTerms:
    """Per-round fixed costs, the per-worker front-end service time and the engine's step token budget."""

    token_budget: int = GPU_TOKEN_BUDGET  # tokens one engine step may compute (decode tokens + prefill chunks)
    router_s: float = 0.3e-3  # the router's hop per round (vllm-router-class proxies add ~0.2–0.4 ms)
    remote_s: float = 1.0e-3  # a remote round's extra HTTP call: P's response to the router, the D request
    export_s: float = 0.5e-3  # a remote round reading history: D's export round trip before P's read
    frontend_s: float = 0.5e-3  # API-server front end per request (one FIFO server per worker)
    # Whether the cost model's T_pre constant already contains one front-end pass (true for a profile,
    # which times prefills through the OpenAI API; false for the roofline, which is pure compute).
    frontend_in_t_pre: bool = False
    prefill_slots: int = 1  # prefills the router lets a prefill worker run at once (RouterConfig.prefill_slots)
    local_prefill_slots: int = 1  # local prefills the router lets a decode worker run at once

    def __post_init__(self) -> None:
        if int(self.token_budget) < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if int(self.prefill_slots) < 1 or int(self.local_prefill_slots) < 1:
            raise ValueError("prefill_slots and local_prefill_slots must be >= 1")
        for f in fields(self):
            if f.name.endswith("_s"):
                v = getattr(self, f.name)
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"serving.{f.name} must be a finite number >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "serving") -> "ServingTerms":
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown term(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            kind = known[name].type
            try:
                if name in ("token_budget", "prefill_slots", "local_prefill_slots"):
                    values[name] = int(value)
                elif name == "frontend_in_t_pre":
                    values[name] = bool(value)
                else:
                    values[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{name}: expected a number, got {value!r} ({kind})") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "ServingTerms":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_model(cls, cost_model: Any) -> "ServingTerms":
        """The terms a cost model carries (a profile's `serving:` section), else defaults for its kind:
        a fitted model without the section keeps its T_pre as measured (front end included, nothing added);
        a roofline gets the GPU defaults."""
        serving = getattr(cost_model, "serving", None)
        if serving:
            return cls.from_dict(serving)
        if getattr(cost_model, "layouts", None) is not None and getattr(cost_model, "links", None) is not None:
            cpu = str(getattr(cost_model, "gpu", "")).lower() == "cpu"
            return cls(token_budget=CPU_TOKEN_BUDGET if cpu else GPU_TOKEN_BUDGET, router_s=0.0, remote_s=0.0,
                       export_s=0.0, frontend_s=0.0, frontend_in_t_pre=True)
        return cls()
