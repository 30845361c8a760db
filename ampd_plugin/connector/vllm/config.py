"""`kv_connector_extra_config` keys of the `ampd` connector, parsed and checked once.

Every key is optional; unknown keys are an error (a typo must not silently fall back to a default).

| key | default | meaning |
|---|---|---|
| `protocol` | `"tcp"` | Mooncake transport: `tcp` (any host) or `rdma` (needs RDMA NICs and the CUDA/RDMA build). |
| `device` | `""` | Mooncake device filter, e.g. `"mlx5_0"` for RDMA; empty = all. |
| `notify_port` | `0` | TCP port of the engine's ZMQ side channel that receives "done reading" notices; 0 = any free port. |
| `retention_ttl_s` | `300` | How long a decode worker pins a finished session round's blocks (0 disables pinning; the prefix cache still keeps them until evicted). |
| `retention_min_free` | `0.1` | Release pins (oldest first) while the free share of KV blocks is below this, and whenever vLLM cannot allocate. |
| `hold_ttl_s` | `60` | Lease on blocks a worker exported (prefill result, history export): released unless the reader renews it within this time (must be > 0). |
| `lease_max_s` | `900` | A lease is never renewed beyond this age (bounds a reader that renews forever). |
| `peers` | `[]` | Worker URLs this engine may fetch `history.from`; empty = only this host's own addresses. |
| `transfer_timeout_s` | `10` | Deadline of one batched Mooncake read; a late or failed read fails the load (→ recompute or error per `kv_load_failure_policy`). |
| `http_timeout_s` | `30` | Deadline of the history-export HTTP call to the worker holding a session. |
| `max_history_wait_s` | `60` | A history read that is not resolved within this time is abandoned (the prompt is computed locally). |
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class AMPDConnectorConfig:
    protocol: str = "tcp"
    device: str = ""
    notify_port: int = 0
    retention_ttl_s: float = 300.0
    retention_min_free: float = 0.1
    hold_ttl_s: float = 60.0
    transfer_timeout_s: float = 10.0
    http_timeout_s: float = 30.0
    max_history_wait_s: float = 60.0
    lease_max_s: float = 900.0
    peers: tuple = ()

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "AMPDConnectorConfig":
        extra = dict(extra or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(fields))
        if unknown:
            raise ValueError(f"ampd connector: unknown kv_connector_extra_config key(s) {unknown}; "
                             f"known: {sorted(fields)}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            default = fields[name].default
            if name == "peers":
                values[name] = _peers(value)
                continue
            try:
                values[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"ampd connector: {name}={value!r} is not a {type(default).__name__}") from exc
        cfg = cls(**values)
        if cfg.protocol not in ("tcp", "rdma"):
            raise ValueError(f"ampd connector: protocol must be 'tcp' or 'rdma', got {cfg.protocol!r}")
        if not 0 <= cfg.notify_port < 65536:
            raise ValueError(f"ampd connector: notify_port out of range: {cfg.notify_port}")
        if not 0.0 <= cfg.retention_min_free < 1.0:
            raise ValueError("ampd connector: retention_min_free must be in [0, 1)")
        for name in ("retention_ttl_s", "transfer_timeout_s", "http_timeout_s", "max_history_wait_s"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"ampd connector: {name} must be >= 0")
        for name in ("hold_ttl_s", "lease_max_s"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"ampd connector: {name} must be > 0 (exported blocks are held under a lease; "
                                 f"a zero lease would free them before any reader could read them)")
        return cfg


def _peers(value: Any) -> tuple:
    from ampd_plugin.connector.params import ParamsError, format_worker_address

    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"ampd connector: peers must be a list of worker URLs, got {value!r}")
    try:
        return tuple(format_worker_address(v) for v in value)
    except ParamsError as exc:
        raise ValueError(f"ampd connector: peers: {exc}") from None
