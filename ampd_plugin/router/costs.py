"""Which cost model the router predicts with.

`--profile FILE` (fitted by `ampd-plugin profile`) is the accurate choice; `--cost-model MODEL` with
`--gpu GPU` gives the roofline. With neither, the router uses a deliberately conservative built-in model
of the tiny CPU test model on a 2-core box (prefill ≈ 20 ms + 1 ms/token, KV over loopback TCP at
~1.6 GB/s); it only has to rank local against remote sensibly until a profile is supplied.
"""

from __future__ import annotations

from ampd_plugin.costmodel import FITTED_VERSION, CostModel, FittedCostModel, build_cost_model

BUILTIN_CPU_PROFILE = {
    "version": FITTED_VERSION,
    "model": "builtin-tiny-cpu",
    "gpu": "cpu",
    "kv_bytes_per_token": 8192,
    "layouts": [
        {
            "tp": 1,
            "pp": 1,
            "prefill": {"a": 0.02, "b": 1.0e-3, "c": 1.0e-7},
            "decode": {"a": 0.01, "b": 1.0e-3, "c": 1.0e-6},
            "kv_capacity_tokens": 65536,
        }
    ],
    "links": {
        "net": {"latency_s": 0.005, "bandwidth_bytes_per_s": 1.6e9},
        "nvlink": {"latency_s": 0.005, "bandwidth_bytes_per_s": 1.6e9},
    },
    "meta": {"source": "ampd_plugin.router.costs builtin default"},
}


def router_cost_model(profile: str | None = None, model: str | None = None, gpu: str | None = None) -> CostModel:
    if profile or model:
        return build_cost_model(model=model, gpu=gpu, profile=profile)
    return FittedCostModel.from_dict(BUILTIN_CPU_PROFILE, source="builtin router default")
