"""Model and GPU specs: the architecture and datasheet facts a roofline needs, and their presets."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml


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
    # Non-empty when the model has layers with state other than plain attention KV (SSM/linear-attention
    # or sliding-window hybrids): the `ampd` connector cannot move it, so no PD plan can serve the model.
    hybrid: str = ""

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
            hybrid=hybrid_reason(cfg),
        )


_HYBRID_KEYS = ("ssm_state_size", "mamba_d_state", "mamba_expand", "state_size", "linear_num_key_heads",
                "hybrid_override_pattern", "layers_block_type", "attn_layer_indices", "full_attn_idxs")
_HYBRID_TYPES = ("mamba", "jamba", "zamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "qwen3_next",
                 "lfm2", "minimax", "bamba", "plamo2", "rwkv", "recurrent_gemma")


def hybrid_reason(cfg: Mapping[str, Any]) -> str:
    """Why a HF config is not a plain-attention model (empty when it is)."""
    kind = str(cfg.get("model_type") or "").lower()
    if any(kind.startswith(t) for t in _HYBRID_TYPES):
        return f"model_type {kind!r} has SSM/linear-attention state"
    for key in _HYBRID_KEYS:
        if cfg.get(key) not in (None, "", [], 0):
            return f"config has {key!r} (SSM/linear-attention layers)"
    kinds = {str(t) for t in (cfg.get("layer_types") or [])} - {"full_attention", "attention"}
    if kinds:
        return f"layer_types has {', '.join(sorted(kinds))} (hybrid KV cache)"
    return ""


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
    nics_per_node: int | None = None  # NICs a node's GPUs share; None = one NIC per GPU (network_gbps each)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "name" and getattr(self, f.name) is not None and not float(getattr(self, f.name)) > 0:
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
