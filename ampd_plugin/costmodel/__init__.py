"""Cost model: how long prefills, decode steps and KV transfers take on a given parallel layout.

The contract (`base.CostModel`; drivers and policies depend on exactly these signatures):

    class CostModel:
        kv_bytes_per_token: int
        def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float      # seconds
        def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float  # one decode step;
              # context_tokens = total KV tokens read by the step (sum over the batch)
        def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float
              # link: "net" (cross-node), "nvlink" (intra-node) or "local" (same worker: 0)
        def kv_capacity_tokens(self, layout: Layout) -> int  # KV tokens one replica can hold

Implementations: `RooflineCostModel` (HF config + GPU spec) and `FittedCostModel` (YAML coefficients).
`build_cost_model(model, gpu, profile)` is the one entry point every CLI uses.

Modules: `layout` (the replica layout every question is asked about, its backend, and which layouts the
connector supports), `base` (the contract), `specs`
(model and GPU specs and presets), `roofline` (the analytic model, formulas in its docstring), `fitted`
(profiled coefficients and their YAML), `fit` (the least-squares fits), `kv_pricing` (per-rank KV-transfer
pricing, remote rounds per backend, a placed deployment's link mix), `build` (the entry point). Nothing here imports the router or policies.
"""

from __future__ import annotations

from ampd_plugin.costmodel.layout import BACKENDS, Layout, layout_refusal, pair_refusal
from ampd_plugin.costmodel.base import LINKS, CostModel
from ampd_plugin.costmodel.specs import GpuSpec, ModelSpec, gpu_presets, load_gpu_spec, load_model_spec, model_presets
from ampd_plugin.costmodel.roofline import Efficiency, RooflineCostModel
from ampd_plugin.costmodel.fitted import FITTED_VERSION, DecodeCoefficients, FittedCostModel, LayoutCoefficients, LinkCoefficients, PrefillCoefficients
from ampd_plugin.costmodel.fit import fit_decode, fit_link, fit_prefill, nonnegative_least_squares
from ampd_plugin.costmodel.kv_pricing import (LinkPricing, RemoteRound, TransferShape, parallel_transfer_seconds,
                                              remote_round, remote_round_seconds, transfer_shape)
from ampd_plugin.costmodel.build import DEFAULT_GPU, build_cost_model

__all__ = [
    "BACKENDS",
    "RemoteRound",
    "TransferShape",
    "layout_refusal",
    "pair_refusal",
    "parallel_transfer_seconds",
    "remote_round",
    "remote_round_seconds",
    "transfer_shape",
    "CostModel",
    "DEFAULT_GPU",
    "DecodeCoefficients",
    "Efficiency",
    "FITTED_VERSION",
    "FittedCostModel",
    "GpuSpec",
    "LINKS",
    "Layout",
    "LayoutCoefficients",
    "LinkCoefficients",
    "LinkPricing",
    "ModelSpec",
    "PrefillCoefficients",
    "RooflineCostModel",
    "build_cost_model",
    "fit_decode",
    "fit_link",
    "fit_prefill",
    "gpu_presets",
    "load_gpu_spec",
    "load_model_spec",
    "model_presets",
    "nonnegative_least_squares",
]
