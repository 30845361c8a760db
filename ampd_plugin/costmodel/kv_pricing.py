"""KV-transfer pricing for a placed deployment: bandwidth overrides and the intra-/cross-node mix.

The cost model prices one transfer over one named link. A planned deployment has both kinds: a share of
its remote prefills pair replicas on one node (NVLink) and the rest cross the network. `LinkPricing`
wraps any cost model so that its default link ("net", what the simulator asks for) returns the expected
cost under the placement, and so that `--link-bw` / `--net-bw` replace the preset's bandwidths.
"""

from __future__ import annotations

from ampd_plugin.costmodel.layout import Layout

TRANSFER_LATENCY_S = 200e-6  # fixed cost per transfer when a bandwidth is overridden (as the roofline)


class LinkPricing:
    """Delegates everything to `base`; re-prices `t_kv`."""

    def __init__(self, base, intra_node_fraction: float | None = None,
                 link_gbps: float | None = None, net_gbps: float | None = None):
        for name, v in (("--link-bw", link_gbps), ("--net-bw", net_gbps)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive GB/s, got {v}")
        if intra_node_fraction is not None and not 0.0 <= intra_node_fraction <= 1.0:
            raise ValueError("intra_node_fraction must be in [0, 1]")
        self.base = base
        self.intra_node_fraction = intra_node_fraction
        self.bandwidth = {"nvlink": link_gbps, "net": net_gbps}

    def __getattr__(self, name):  # t_pre, t_dec, kv_capacity_tokens, kv_bytes_per_token, ...
        return getattr(self.base, name)

    def _one(self, tokens: int, src: Layout, dst: Layout, link: str) -> float:
        gbps = self.bandwidth.get(link)
        if gbps is None or link == "local" or tokens <= 0:
            return self.base.t_kv(tokens, src, dst, link)
        nbytes = tokens * self.base.kv_bytes_per_token
        return TRANSFER_LATENCY_S + nbytes / (gbps * 1e9 * min(src.devices, dst.devices))

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        f = self.intra_node_fraction
        if link != "net" or f is None:
            return self._one(tokens, src, dst, link)
        fast = self._one(tokens, src, dst, "nvlink") if f > 0 else 0.0
        slow = self._one(tokens, src, dst, "net") if f < 1 else 0.0
        return f * fast + (1.0 - f) * slow
