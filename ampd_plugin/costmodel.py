"""Cost model: how long prefills, decode steps and KV transfers take on a given parallel layout.

CONTRACT (owned by the core issue; drivers and policies depend on exactly these signatures):

    class CostModel:
        kv_bytes_per_token: int
        def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float      # seconds
        def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float  # one decode step;
              # context_tokens = total KV tokens read by the step (sum over the batch)
        def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float
              # link: "net" (cross-node), "nvlink" (intra-node) or "local" (same worker: 0)
        def kv_capacity_tokens(self, layout: Layout) -> int  # KV tokens one replica can hold

Implementations: `RooflineCostModel` (HF config + GPU spec) and `FittedCostModel` (YAML coefficients).
"""
