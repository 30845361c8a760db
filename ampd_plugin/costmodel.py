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
`build_cost_model(model, gpu, profile)` is the one entry point every CLI uses.

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
    t_kv               = transfer_latency + tokens·kv_bytes_per_token / (min(src,dst devices)·link_bw)
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

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ampd_plugin.router_policy.state import Layout

LINKS = ("net", "nvlink", "local")
FITTED_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Model and GPU specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts a roofline needs, named like Hugging Face `config.json` keys."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_local_experts: int = 1  # 1 = dense
    num_experts_per_tok: int = 1
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    kv_dtype_bytes: int = 2
    hf_id: str = ""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "num_local_experts",
                     "num_experts_per_tok", "dtype_bytes", "kv_dtype_bytes"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model {self.name!r}: {name} must be positive, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"model {self.name!r}: num_experts_per_tok > num_local_experts")

    @cached_property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    @cached_property
    def attention_params_per_layer(self) -> int:
        h, d = self.hidden_size, self.head_dim
        return 2 * h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d  # Q,O + K,V

    @cached_property
    def expert_params(self) -> int:
        """One gated (SwiGLU) MLP: gate, up, down."""
        return 3 * self.hidden_size * self.intermediate_size

    @cached_property
    def dense_params_per_layer(self) -> int:
        """Per-layer weights every token reads: attention, norms and (MoE) the router."""
        router = self.hidden_size * self.num_local_experts if self.is_moe else 0
        return self.attention_params_per_layer + 2 * self.hidden_size + router

    @cached_property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one table when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @cached_property
    def total_params(self) -> int:
        per_layer = self.dense_params_per_layer + self.num_local_experts * self.expert_params
        return self.num_hidden_layers * per_layer + self.embedding_params + self.hidden_size

    @cached_property
    def active_params(self) -> int:
        """Parameters one token multiplies through (all of them except unused experts and the embedding)."""
        per_layer = self.dense_params_per_layer + self.num_experts_per_tok * self.expert_params
        return self.num_hidden_layers * per_layer + self.vocab_size * self.hidden_size

    @cached_property
    def weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * self.kv_dtype_bytes

    def weight_bytes_read(self, tokens: int) -> float:
        """Bytes of weights one forward pass over `tokens` tokens reads (MoE: expected touched experts)."""
        L = self.num_hidden_layers
        dense = L * self.dense_params_per_layer + self.vocab_size * self.hidden_size  # + LM head
        experts = L * self.num_local_experts * self.expert_params
        if self.is_moe:
            k, e = self.num_experts_per_tok, self.num_local_experts
            experts *= 1.0 - (1.0 - k / e) ** max(tokens, 1)
        return (dense + experts) * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str = "custom") -> "ModelSpec":
        """Build from a Hugging Face `config.json` dict (Llama/Qwen/Mistral/Mixtral/Qwen-MoE style)."""
        cfg = dict(config.get("text_config") or config)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
        except KeyError as exc:
            raise ValueError(f"model config {name!r} lacks required field {exc.args[0]!r}") from None
        experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
        intermediate = cfg.get("moe_intermediate_size") if experts > 1 and cfg.get("moe_intermediate_size") \
            else cfg.get("intermediate_size")
        if intermediate is None:
            raise ValueError(f"model config {name!r} lacks required field 'intermediate_size'")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        dtype_bytes = int(cfg.get("dtype_bytes") or _DTYPE_BYTES.get(dtype, 2))
        return cls(
            name=name,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(intermediate),
            vocab_size=vocab,
            num_local_experts=experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
            kv_dtype_bytes=int(cfg.get("kv_dtype_bytes") or dtype_bytes),
            hf_id=str(cfg.get("hf_id") or cfg.get("_name_or_path") or ""),
        )


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8": 1, "fp8": 1}


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator's datasheet numbers (see `data/gpus.yaml` for units and sources)."""

    name: str
    bf16_tflops: float
    hbm_gbps: float
    memory_gb: float
    nvlink_gbps: float  # both directions, as vendors quote it
    network_gbps: float  # per GPU, one direction
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "name" and not float(getattr(self, f.name)) > 0:
                raise ValueError(f"gpu {self.name!r}: {f.name} must be positive, got {getattr(self, f.name)!r}")

    @cached_property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @cached_property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @cached_property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @cached_property
    def nvlink_bytes_per_s(self) -> float:
        """One direction."""
        return self.nvlink_gbps * 1e9 / 2

    @cached_property
    def network_bytes_per_s(self) -> float:
        return self.network_gbps * 1e9


def _load_data(filename: str) -> dict[str, dict]:
    text = resources.files("ampd_plugin").joinpath("data", filename).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


@lru_cache(maxsize=None)
def model_presets() -> dict[str, dict]:
    return _load_data("models.yaml")


@lru_cache(maxsize=None)
def gpu_presets() -> dict[str, dict]:
    return _load_data("gpus.yaml")


def _lookup(presets: Mapping[str, dict], name: str) -> tuple[str, dict] | None:
    wanted = name.strip().lower()
    for key, value in presets.items():
        if key.lower() == wanted or str(value.get("hf_id", "")).lower() == wanted:
            return key, value
    return None


def load_model_spec(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """A preset name (case-insensitive, or its HF id), a `config.json` path, or a directory holding one."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    found = _lookup(model_presets(), str(name_or_path))
    if found:
        return ModelSpec.from_hf_config(found[1], name=found[0])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"model config {path} is not a JSON object")
        return ModelSpec.from_hf_config(config, name=path.parent.name or str(path))
    known = ", ".join(model_presets())
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a preset ({known}) and not a config.json path")


def load_gpu_spec(name: str | GpuSpec) -> GpuSpec:
    """A GPU preset by name (case-insensitive)."""
    if isinstance(name, GpuSpec):
        return name
    found = _lookup(gpu_presets(), str(name))
    if not found:
        raise ValueError(f"unknown GPU {str(name)!r}; known GPUs: {', '.join(gpu_presets())}")
    key, value = found
    return GpuSpec(name=key, **{k: v for k, v in value.items() if k in _GPU_FIELDS})


_GPU_FIELDS = {f.name for f in fields(GpuSpec)} - {"name"}


# ----------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------


class CostModel(ABC):
    """Predicts service times; the router uses it for decisions, the simulator for event times."""

    kv_bytes_per_token: int

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


def _check_tokens(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_link(link: str) -> None:
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; expected one of {', '.join(LINKS)}")


# ----------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------


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
        _check_tokens(l_hist=l_hist, l_incr=l_incr)
        l_incr = max(int(l_incr), 1)
        compute_or_memory = self._roofline(self.prefill_flops(l_hist, l_incr), self.prefill_bytes(l_hist, l_incr, layout),
                                           layout, self.efficiency.mfu_prefill)
        return compute_or_memory + self.comm_time(l_incr, layout) + self.overhead()

    def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float:
        _check_tokens(batch=batch, context_tokens=context_tokens)
        if batch == 0:
            return 0.0
        compute_or_memory = self._roofline(self.decode_flops(batch, context_tokens),
                                           self.decode_bytes(batch, context_tokens, layout),
                                           layout, self.efficiency.mfu_decode)
        return compute_or_memory + self.comm_time(batch, layout) + self.overhead()

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        _check_tokens(tokens=tokens)
        _check_link(link)
        if link == "local" or tokens == 0:
            return 0.0
        per_device = self.gpu.network_bytes_per_s if link == "net" else self.gpu.nvlink_bytes_per_s
        bandwidth = per_device * self.efficiency.link_efficiency * min(src.devices, dst.devices)
        return self.efficiency.transfer_latency_s + tokens * self.kv_bytes_per_token / bandwidth

    def kv_capacity_tokens(self, layout: Layout) -> int:
        free = self.gpu.memory_bytes * self.efficiency.memory_utilization * layout.devices - self.model.weight_bytes
        if free <= 0:
            return 0
        return int(free // (self.kv_bytes_per_token * self.kv_replication(layout)))

    def fits(self, layout: Layout) -> bool:
        """Whether the weights fit with room for at least one KV token."""
        return self.kv_capacity_tokens(layout) > 0


# ----------------------------------------------------------------------------------------------
# Fitted (profiled) coefficients
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillCoefficients:
    """t_pre = a + b·l_incr + c·l_incr·(l_hist + l_incr/2)   (seconds; DistServe's a + b·Σl + c·Σl², causal)."""

    a: float
    b: float
    c: float

    def __call__(self, l_hist: int, l_incr: int) -> float:
        return self.a + self.b * l_incr + self.c * l_incr * (l_hist + l_incr / 2)


@dataclass(frozen=True)
class DecodeCoefficients:
    """t_dec = a + b·batch + c·context_tokens   (seconds per step)."""

    a: float
    b: float
    c: float

    def __call__(self, batch: int, context_tokens: int) -> float:
        return self.a + self.b * batch + self.c * context_tokens


@dataclass(frozen=True)
class LinkCoefficients:
    """t_kv = latency_s + bytes / bandwidth_bytes_per_s."""

    latency_s: float
    bandwidth_bytes_per_s: float

    def __call__(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class LayoutCoefficients:
    layout: Layout
    prefill: PrefillCoefficients
    decode: DecodeCoefficients
    kv_capacity_tokens: int


@dataclass
class FittedCostModel(CostModel):
    """Coefficients measured on a real engine (written by `ampd-plugin profile`), one set per layout.

    A layout missing from the profile is answered by `fallback` (e.g. the roofline for the same model)
    when given, otherwise it is a ValueError naming the profiled layouts.
    """

    kv_bytes_per_token: int
    layouts: dict[Layout, LayoutCoefficients]
    links: dict[str, LinkCoefficients]
    model: str = ""
    gpu: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    fallback: CostModel | None = None

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0:
            raise ValueError("kv_bytes_per_token must be positive")
        if not self.layouts:
            raise ValueError("a fitted cost model needs coefficients for at least one layout")

    def _coeffs(self, layout: Layout) -> LayoutCoefficients | None:
        found = self.layouts.get(layout)
        if found is None and self.fallback is None:
            known = ", ".join(f"tp={l.tp},pp={l.pp}" for l in self.layouts)
            raise ValueError(f"no fitted coefficients for layout tp={layout.tp},pp={layout.pp}; profiled: {known}")
        return found

    def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        _check_tokens(l_hist=l_hist, l_incr=l_incr)
        c = self._coeffs(layout)
        if c is None:
            return self.fallback.t_pre(l_hist, l_incr, layout)
        return max(0.0, c.prefill(l_hist, max(int(l_incr), 1)))

    def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float:
        _check_tokens(batch=batch, context_tokens=context_tokens)
        if batch == 0:
            return 0.0
        c = self._coeffs(layout)
        if c is None:
            return self.fallback.t_dec(batch, context_tokens, layout)
        return max(0.0, c.decode(batch, context_tokens))

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        _check_tokens(tokens=tokens)
        _check_link(link)
        if link == "local" or tokens == 0:
            return 0.0
        coeffs = self.links.get(link)
        if coeffs is None:
            if self.fallback is not None:
                return self.fallback.t_kv(tokens, src, dst, link)
            raise ValueError(f"no fitted coefficients for link {link!r}; profiled: {', '.join(self.links)}")
        return coeffs(tokens * self.kv_bytes_per_token)

    def kv_capacity_tokens(self, layout: Layout) -> int:
        c = self._coeffs(layout)
        if c is None:
            return self.fallback.kv_capacity_tokens(layout)
        return c.kv_capacity_tokens

    # -- YAML --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FITTED_VERSION,
            "model": self.model,
            "gpu": self.gpu,
            "kv_bytes_per_token": int(self.kv_bytes_per_token),
            "layouts": [
                {
                    "tp": c.layout.tp,
                    "pp": c.layout.pp,
                    "prefill": _floats(asdict(c.prefill)),
                    "decode": _floats(asdict(c.decode)),
                    "kv_capacity_tokens": int(c.kv_capacity_tokens),
                }
                for c in self.layouts.values()
            ],
            "links": {name: _floats(asdict(link)) for name, link in self.links.items()},
            "meta": dict(self.meta),
        }

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], fallback: CostModel | None = None,
                  source: str = "profile") -> "FittedCostModel":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a YAML mapping at top level")
        version = data.get("version")
        if version != FITTED_VERSION:
            raise ValueError(f"{source}: unsupported profile version {version!r} (this build reads {FITTED_VERSION})")
        try:
            layouts: dict[Layout, LayoutCoefficients] = {}
            for i, entry in enumerate(data["layouts"]):
                layout = Layout(tp=int(entry.get("tp", 1)), pp=int(entry.get("pp", 1)))
                layouts[layout] = LayoutCoefficients(
                    layout=layout,
                    prefill=PrefillCoefficients(**_coeff_fields(entry["prefill"], "abc", f"{source}: layouts[{i}].prefill")),
                    decode=DecodeCoefficients(**_coeff_fields(entry["decode"], "abc", f"{source}: layouts[{i}].decode")),
                    kv_capacity_tokens=int(entry["kv_capacity_tokens"]),
                )
            links = {
                str(name): LinkCoefficients(**_coeff_fields(value, ("latency_s", "bandwidth_bytes_per_s"),
                                                            f"{source}: links.{name}"))
                for name, value in (data.get("links") or {}).items()
            }
            for name, link in links.items():
                _check_link(name)
                if link.bandwidth_bytes_per_s <= 0:
                    raise ValueError(f"{source}: links.{name}.bandwidth_bytes_per_s must be positive")
            return cls(kv_bytes_per_token=int(data["kv_bytes_per_token"]), layouts=layouts, links=links,
                       model=str(data.get("model", "")), gpu=str(data.get("gpu", "")),
                       meta=dict(data.get("meta") or {}), fallback=fallback)
        except KeyError as exc:
            raise ValueError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"{source}: malformed profile ({exc})") from None

    @classmethod
    def from_yaml(cls, path_or_text: str | Path, fallback: CostModel | None = None) -> "FittedCostModel":
        """Load from a YAML file path (or YAML text containing a newline)."""
        source = str(path_or_text)
        if isinstance(path_or_text, Path) or "\n" not in source:
            try:
                text = Path(path_or_text).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read cost-model profile {source}: {exc}") from None
        else:
            text, source = source, "profile"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML ({exc})") from None
        return cls.from_dict(data, fallback=fallback, source=source)


def _floats(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def _coeff_fields(entry: Any, names: Iterable[str], where: str) -> dict[str, float]:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping")
    out = {}
    for name in names:
        if name not in entry:
            raise ValueError(f"{where}: missing coefficient {name!r}")
        value = float(entry[name])
        if not math.isfinite(value):
            raise ValueError(f"{where}.{name}: not a finite number")
        out[name] = value
    return out


def fit_prefill(samples: Sequence[tuple[int, int, float]]) -> PrefillCoefficients:
    """Least squares (non-negative) of `PrefillCoefficients` to (l_hist, l_incr, seconds) measurements."""
    import numpy as np
    from scipy.optimize import nnls

    rows = np.array([[1.0, l_incr, l_incr * (l_hist + l_incr / 2)] for l_hist, l_incr, _ in samples])
    y = np.array([s[2] for s in samples], dtype=float)
    if len(samples) < 3:
        raise ValueError("fit_prefill needs at least 3 samples")
    a, b, c = nnls(rows, y)[0]
    return PrefillCoefficients(float(a), float(b), float(c))


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> DecodeCoefficients:
    """Least squares (non-negative) of `DecodeCoefficients` to (batch, context_tokens, seconds) measurements."""
    import numpy as np
    from scipy.optimize import nnls

    rows = np.array([[1.0, batch, ctx] for batch, ctx, _ in samples], dtype=float)
    y = np.array([s[2] for s in samples], dtype=float)
    if len(samples) < 3:
        raise ValueError("fit_decode needs at least 3 samples")
    a, b, c = nnls(rows, y)[0]
    return DecodeCoefficients(float(a), float(b), float(c))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

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
