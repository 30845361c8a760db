"""Fitted (profiled) cost model: coefficients measured on a real engine, read from and written to YAML."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ampd_plugin.costmodel.base import CostModel, check_link, check_tokens
from ampd_plugin.costmodel.kv_pricing import parallel_transfer_seconds
from ampd_plugin.costmodel.layout import Layout

FITTED_VERSION = 1


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
    # Serving-path terms measured by `profile` (router hop, front end, token budget; see planner.serving).
    serving: dict[str, Any] = field(default_factory=dict)
    # KV heads of the model: a transfer between TP layouts moves each rank's head slice (kv_pricing).
    num_key_value_heads: int | None = None

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0:
            raise ValueError("kv_bytes_per_token must be positive")
        if not self.layouts:
            raise ValueError("a fitted cost model needs coefficients for at least one layout")
        if self.num_key_value_heads is None and self.fallback is not None:  # the profile's model, from the roofline
            self.num_key_value_heads = getattr(self.fallback, "num_key_value_heads", None)

    def _coeffs(self, layout: Layout) -> LayoutCoefficients | None:
        found = self.layouts.get(layout)
        if found is None and self.fallback is None:
            known = ", ".join(f"tp={l.tp},pp={l.pp}" for l in self.layouts)
            raise ValueError(f"no fitted coefficients for layout tp={layout.tp},pp={layout.pp}; profiled: {known}")
        return found

    def t_pre(self, l_hist: int, l_incr: int, layout: Layout) -> float:
        check_tokens(l_hist=l_hist, l_incr=l_incr)
        c = self._coeffs(layout)
        if c is None:
            return self.fallback.t_pre(l_hist, l_incr, layout)
        return max(0.0, c.prefill(l_hist, max(int(l_incr), 1)))

    def t_dec(self, batch: int, context_tokens: int, layout: Layout) -> float:
        check_tokens(batch=batch, context_tokens=context_tokens)
        if batch == 0:
            return 0.0
        c = self._coeffs(layout)
        if c is None:
            return self.fallback.t_dec(batch, context_tokens, layout)
        return max(0.0, c.decode(batch, context_tokens))

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        check_tokens(tokens=tokens)
        check_link(link)
        if link == "local" or tokens == 0:
            return 0.0
        coeffs = self.links.get(link)
        if coeffs is None:
            if self.fallback is not None:
                return self.fallback.t_kv(tokens, src, dst, link)
            raise ValueError(f"no fitted coefficients for link {link!r}; profiled: {', '.join(self.links)}")
        return parallel_transfer_seconds(tokens, self.kv_bytes_per_token, self.num_key_value_heads, src, dst,
                                         coeffs.bandwidth_bytes_per_s, coeffs.latency_s)

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
            **({"num_key_value_heads": int(self.num_key_value_heads)} if self.num_key_value_heads else {}),
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
            **({"serving": dict(self.serving)} if self.serving else {}),
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
                check_link(name)
                if link.bandwidth_bytes_per_s <= 0:
                    raise ValueError(f"{source}: links.{name}.bandwidth_bytes_per_s must be positive")
            return cls(kv_bytes_per_token=int(data["kv_bytes_per_token"]), layouts=layouts, links=links,
                       model=str(data.get("model", "")), gpu=str(data.get("gpu", "")),
                       meta=dict(data.get("meta") or {}), fallback=fallback,
                       serving=dict(data.get("serving") or {}),
                       num_key_value_heads=_heads(data.get("num_key_value_heads"), source))
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


def _heads(value: Any, source: str) -> int | None:
    if value is None:
        return None
    heads = int(value)
    if heads <= 0:
        raise ValueError(f"{source}: num_key_value_heads must be positive")
    return heads


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
