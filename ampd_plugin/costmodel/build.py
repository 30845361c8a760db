"""The one way CLIs get a cost model: a fitted profile, the roofline, or the profile over the roofline."""

from __future__ import annotations

from pathlib import Path

from ampd_plugin.costmodel.base import CostModel
from ampd_plugin.costmodel.fitted import FittedCostModel
from ampd_plugin.costmodel.roofline import RooflineCostModel
from ampd_plugin.costmodel.specs import GpuSpec, ModelSpec

DEFAULT_GPU = "H20"  # the AMPD paper's hardware


def build_cost_model(model: str | Path | ModelSpec | None = None, gpu: str | GpuSpec | None = None,
                     profile: str | Path | None = None, **efficiency: float) -> CostModel:
    """The one way CLIs get a cost model.

    - `profile` given: the fitted coefficients; layouts it lacks fall back to the roofline when `model`
      is also given (GPU defaults to H20).
    - otherwise: the roofline of `model` on `gpu` (default H20, the AMPD paper's GPU).
    `efficiency` overrides `Efficiency` fields of the roofline (e.g. mfu_prefill=0.5).
    """
    roofline = RooflineCostModel(model, gpu or DEFAULT_GPU, **efficiency) if model is not None else None
    if profile is not None:
        return FittedCostModel.from_yaml(profile, fallback=roofline)
    if roofline is None:
        raise ValueError("build_cost_model needs a model (preset or config.json) or a fitted profile")
    return roofline