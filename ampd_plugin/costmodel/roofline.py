"""Analytic (roofline) cost model.

Roofline formulas (per replica with layout tp×pp; L layers, h hidden, n_q/n_kv heads, d head_dim,
V vocab, P_act/P_tot active/total parameters of the transformer layers, b = dtype bytes):

    kv_bytes_per_token = 2·L·n_kv·d·b_kv
    prefill FLOPs      = 2·P_act·l_incr + 2·V·h  +  4·L·n_q·d·l_incr·(l_hist + l_incr/2)   (causal;
                         LM head for the last position only)
    prefill bytes      = W_read(l_incr) + (l_hist + 2·l_incr)·kv_bytes_per_token   (read history, write new)
    decode FLOPs       = 2·(P_act + V·h)·batch + 4·L·n_q·d·context_tokens
    decode bytes       = W_read(batch) + (context_tokens + batch)·kv_bytes_per_token
    t = max(FLOPs / (tp·peak·mfu), bytes / (tp·HBM·mem_eff)) + t_allreduce + t_pp + overheads
    t_allreduce        = 2·L·(ar_latency + 2·(tp−1)/tp · tokens·h·b / link_bw)     (ring, 2 per layer)
    t_pp               = (pp−1)·(ar_latency + tokens·h·b / link_bw)                (stage hand-offs)
    overheads          = step_overhead + L·layer_overhead
    t_kv               = transfer_latency + the busiest rank's (or NIC-limited host's) bytes / per-rank link_bw
                         (`kv_pricing.parallel_transfer_seconds`: every TP rank reads its head slice in
                         parallel; = tokens·kv_bytes_per_token / (min(src,dst tp)·link_bw) when the heads
                         split evenly on both sides and each GPU has its own NIC)
    kv_capacity_tokens = (memory·util·devices − total weight bytes) / (kv_bytes_per_token·max(1, tp/n_kv))

W_read(n) is the weight bytes one forward pass reads: all dense weights plus, for MoE, the experts that
n tokens are expected to touch, E·(1 − (1 − k/E)^n) of E. So MoE FLOPs use *active* parameters while
memory capacity uses *total* parameters. Pipeline parallelism splits layers over stages that one request
traverses in turn: it adds memory (capacity) but does not shorten one prefill or one decode step
(micro-batch interleaving across requests is not modelled). Link bandwidth is NVLink (per direction)
while the replica fits in one node, the network otherwise. KV is sharded over TP ranks; when tp > n_kv,
KV heads are replicated, which costs capacity.
"""


from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ampd_plugin.costmodel.base import CostModel, check_link, check_tokens
from ampd_plugin.costmodel.kv_pricing import parallel_transfer_seconds
from ampd_plugin.costmodel.layout import Layout
from ampd_plugin.costmodel.specs import GpuSpec, ModelSpec, load_gpu_spec, load_model_spec


@dataclass(frozen=True)
class Efficiency:
    """Calibration knobs. Defaults follow BLIS/llm-d's roofline calibration (planner_loadtest.md §2.4)."""

    mfu_prefill: float = 0.65  # share of peak FLOP/s a prefill reaches
    mfu_decode: float = 0.5  # share of peak FLOP/s large decode batches reach
    hbm_efficiency: float = 0.72  # share of HBM bandwidth reached
    link_efficiency: float = 0.8  # share of NVLink/network bandwidth reached
    memory_utilization: float = 0.9  # share of device memory the engine may use (vLLM default)
    step_overhead_s: float = 500e-6  # per forward pass (scheduling, launch)
    layer_overhead_s: float = 20e-6  # per layer per forward pass
    allreduce_latency_s: float = 20e-6  # fixed cost of one collective / stage hand-off
    transfer_latency_s: float = 200e-6  # fixed cost of one KV transfer (handshake, descriptors)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s"):
                if value < 0:
                    raise ValueError(f"{f.name} must be >= 0, got {value}")
            elif not 0 < value <= 1:
                raise ValueError(f"{f.name} must be in (0, 1], got {value}")


class RooflineCostModel(CostModel):
    """Analytic model from a `ModelSpec` and a `GpuSpec`; formulas in the module docstring."""

    def __init__(self, model: ModelSpec | str, gpu: GpuSpec | str, efficiency: Efficiency | None = None,
                 **overrides: float) -> None:
        self.model = load_model_spec(model)
        self.gpu = load_gpu_spec(gpu)
        base = efficiency or Efficiency()
        self.efficiency = Efficiency(**{**asdict(base), **overrides}) if overrides else base
        self.kv_bytes_per_token = self.model.kv_bytes_per_token

    @property
    def num_key_value_heads(self) -> int:
        return self.model.num_key_value_heads

    def __repr__(self) -> str:
        return f"RooflineCostModel(model={self.model.name!r}, gpu={self.gpu.name!r})"

    # -- pieces (public so tests and the planner can inspect them) ------------------------------

    def link_bandwidth(self, layout: Layout) -> float:
        """Bytes/s (one direction, after efficiency) of the link joining one replica's devices."""
        raw = self.gpu.nvlink_bytes_per_s if layout.devices <= self.gpu.gpus_per_node else self.gpu.network_bytes_per_s
        return raw * self.efficiency.link_efficiency

    def kv_replication(self, layout: Layout) -> float:
        """How many copies of each KV head a TP group stores (> 1 when tp exceeds the KV heads)."""
        return max(1.0, layout.tp / self.model.num_key_value_heads)

    def comm_time(self, tokens: int, layout: Layout) -> float:
        """TP all-reduces (2 per layer, ring) plus PP stage hand-offs for a pass over `tokens` tokens."""
        m, e = self.model, self.efficiency
        msg = tokens * m.hidden_size * m.dtype_bytes
        bw = self.link_bandwidth(layout)
        t = 0.0
        if layout.tp > 1:
            t += 2 * m.num_hidden_layers * (e.allreduce_latency_s + 2 * (layout.tp - 1) / layout.tp * msg / bw)
        if layout.pp > 1:
            t += (layout.pp - 1) * (e.allreduce_latency_s + msg / bw)
        return t

    def overhead(self) -> float:
        return self.efficiency.step_overhead_s + self.model.num_hidden_layers * self.efficiency.layer_overhead_s

    def _roofline(self, flops: float, bytes_: float, layout: Layout, mfu: float) -> float:
        compute = flops / (layout.tp * self.gpu.peak_flops * mfu)
        memory = bytes_ / (layout.tp * self.gpu.hbm_bytes_per_s * self.efficiency.hbm_efficiency)
        return max(compute, memory)

    def prefill_flops(self, l_hist: int, l_incr: int) -> float:
        m = self.model
        attn = 4 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * l_incr * (l_hist + l_incr / 2)
        lm_head = m.vocab_size * m.hidden_size  # logits of the last position only
        return 2 * (m.active_params - lm_head) * l_incr + 2 * lm_head + attn

    def prefill_bytes(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        kv = (l_hist + 2 * l_incr) * self.kv_bytes_per_token * self.kv_replication(layout)
        return self.model.weight_bytes_read(l_incr) + kv

    def decode_flops(self, batch: int, context_tokens: int) -> float:
        m = self.model
        return 2 * m.active_params * batch + 4 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * context_tokens

    def decode_bytes(self, batch: int, context_tokens: int, layout: Layout) -> float:
        kv = (context_tokens + batch) * self.kv_bytes_per_token * self.kv_replication(layout)
        return self.model.weight_bytes_read(batch) + kv

    # -- contract --------------------------------------------------------------------------------

    def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        check_tokens(l_hist=l_hist, l_incr=l_incr)
        l_incr = max(int(l_incr), 1)
        compute_or_memory = self._roofline(self.prefill_flops(l_hist, l_incr), self.prefill_bytes(l_hist, l_incr, layout),
                                           layout, self.efficiency.mfu_prefill)
        return compute_or_memory + self.comm_time(l_incr, layout) + self.overhead()

    def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float:
        check_tokens(batch=batch, context_tokens=context_tokens)
        if batch == 0:
            return 0.0
        compute_or_memory = self._roofline(self.decode_flops(batch, context_tokens),
                                           self.decode_bytes(batch, context_tokens, layout),
                                           layout, self.efficiency.mfu_decode)
        return compute_or_memory + self.comm_time(batch, layout) + self.overhead()

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        check_tokens(tokens=tokens)
        check_link(link)
        if link == "local" or tokens == 0:
            return 0.0
        per_rank = self.gpu.network_bytes_per_s if link == "net" else self.gpu.nvlink_bytes_per_s
        nics = self.gpu.nics_per_node if link == "net" else None
        return parallel_transfer_seconds(tokens, self.kv_bytes_per_token, self.model.num_key_value_heads, src, dst,
                                         per_rank * self.efficiency.link_efficiency,
                                         self.efficiency.transfer_latency_s, nics, self.gpu.gpus_per_node)

    def kv_capacity_tokens(self, layout: Layout) -> int:
        free = self.gpu.memory_bytes * self.efficiency.memory_utilization * layout.devices - self.model.weight_bytes
        if free <= 0:
            return 0
        return int(free // (self.kv_bytes_per_token * self.kv_replication(layout)))

    def fits(self, layout: Layout) -> bool:
        """Whether the weights fit with room for at least one KV token."""
        return self.kv_capacity_tokens(layout) > 0
