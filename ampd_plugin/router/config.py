"""Router configuration: one dataclass filled from a YAML file, then overridden by command-line flags.

Keys of the YAML file are the field names below (see docs/router.md); `policy_params` is handed to the
policy unchanged (e.g. `alpha`, `beta`, `window`), so a third-party policy can take its own parameters.
The API key is never read from YAML into logs: `redacted()` is what gets logged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RouterConfig:
    prefill: list[str] = field(default_factory=list)  # prefill worker base URLs
    decode: list[str] = field(default_factory=list)  # decode worker base URLs
    policy: str = "ampd"
    policy_params: dict[str, Any] = field(default_factory=dict)
    kv_connector: str = "ampd"  # "ampd" | "none" (no KV movement: every prefill local)
    engine: str = "vllm"  # "vllm" | "sglang": which PD wire the workers speak (docs/router.md "SGLang workers")
    bootstrap_ports: list[int] = field(default_factory=list)  # SGLang: each prefill's bootstrap port, in order
    ttft_slo: float = 2.0  # seconds
    itl_slo: float = 0.1  # seconds
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model: str | None = None  # served model name; discovered from /v1/models when None
    tokenizer: str | None = None  # HF tokenizer dir/name; discovered from the engine's model root when None
    profile: str | None = None  # fitted cost-model YAML (`ampd-plugin profile`)
    cost_model: str | None = None  # roofline: model preset or config.json path (with `gpu`)
    gpu: str | None = None
    # Strategies written on the sub-request primitives.
    balanced_pd_share: float = 0.0  # >0: remote rounds split the prompt, P prefills this share, D the rest
    migrate_on_kv_pressure: bool = True  # move a session's KV to another decode worker instead of dropping it
    decode_kv_tokens: int | None = None  # KV capacity of a decode worker in tokens (else the cost model's)
    # Admission and queues.
    prefill_slots: int = 1  # prefills in flight per prefill worker (the rest wait in the router's queue)
    local_prefill_slots: int = 1  # local prefills in flight per decode worker
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_tokens: int | None = None  # else the engine's max_model_len
    # Client input bounds (router/limits.py): what one request may make the router hold or spend.
    max_header_bytes: int = 32 * 1024  # request line + headers; larger heads get 431 before being buffered
    max_headers: int = 100  # header fields per request (431 beyond)
    client_header_timeout_s: float = 10.0  # the whole request head must arrive within this (408)
    client_body_timeout_s: float = 10.0  # longest silence while a body is being sent (connection closed)
    max_json_depth: int = 32  # deeper bodies get 400 (OpenAI requests nest ~6 levels)
    max_prompt_chars: int | None = None  # refuse longer prompt text before tokenizing; default 32 × max_prompt_tokens
    # Health and timeouts.
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    health_slow_checks: int = 3  # unanswered health checks in a row that take a worker out (refused: at once)
    connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 600.0  # whole request
    read_timeout_s: float = 120.0  # silence of a non-streaming decode request (its whole generation)
    stall_timeout_s: float = 30.0  # silence of a stream or a prefill: the request fails, its slot frees
    # A stream that breaks or stalls mid-round continues on another decode worker at most this often per
    # request (router/failover.py); 0 = the client gets an error event instead.
    failover_limit: int = 1
    # Outlier ejection (router/outliers.py).
    eject_after_failures: int = 3  # consecutive failed requests (5xx, timeout, stall) that eject a worker
    eject_base_s: float = 10.0  # first ejection's back-off; doubles per ejection in a row
    eject_max_s: float = 300.0
    session_ttl_s: float = 1800.0  # a session idle this long is forgotten (its binding and prompt go)
    max_sessions: int = 100_000  # beyond: the least recently used idle session is forgotten
    max_stored_prompt_chars: int = 256 * 2**20  # prompt + output text kept; beyond: oldest kept as digests
    # How long a finished round's KV counts as resident on its decode worker; None = the connector's own
    # retention TTL as each engine reports it (its default, 300 s, until it does). router/ledger.py.
    residency_ttl_s: float | None = None
    session_wait_s: float = 60.0  # a round waits this long for its session's previous round, then 409
    # Online recalibration of a fitted cost model (router/recalibration.py); off unless enabled.
    refit_online: bool = False
    refit_out: str | None = None  # write the refitted profile YAML here after every refit (enables refitting)
    refit_min_samples: int = 50
    refit_max_step: float = 0.25  # a coefficient moves by at most this fraction per refit
    refit_interval_s: float = 60.0
    # Router replicas (router/redis_store.py): redis://HOST:PORT/DB shared by every replica; None = this
    # process only. The password comes from env AMPD_REDIS_PASSWORD or AMPD_REDIS_PASSWORD_FILE, never the URL.
    state: str | None = None
    state_prefix: str = "ampd"  # key prefix: one per deployment sharing a Redis
    replica_id: str | None = None  # default: host-pid-random
    state_lock_ttl_s: float = 15.0  # a dead replica's session locks lapse after this
    log_level: str = "info"
    decision_log: bool = True

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RouterConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of router settings, got {type(data).__name__}")
        return cls().updated(data, source=str(path))

    def updated(self, values: dict[str, Any], source: str = "flags") -> "RouterConfig":
        """A copy with `values` applied (None values are ignored); unknown keys are an error, not a typo."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown router setting(s) {unknown}; known: {sorted(known)}")
        changes = {k: v for k, v in values.items() if v is not None}
        if "policy_params" in changes:
            changes["policy_params"] = {**self.policy_params, **changes["policy_params"]}
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if not self.decode:
            raise ValueError("at least one --decode worker is required")
        if self.kv_connector == "mooncake":
            raise ValueError("--kv-connector mooncake (vLLM's in-tree flow) is not supported by this router; "
                             "use vLLM's mooncake_connector_proxy.py for that baseline, or --kv-connector ampd")
        if self.kv_connector not in ("ampd", "none"):
            raise ValueError(f"--kv-connector must be ampd or none, not {self.kv_connector!r}")
        if self.engine not in ("vllm", "sglang"):
            raise ValueError(f"--engine must be vllm or sglang, not {self.engine!r}")
        if not isinstance(self.bootstrap_ports, list):
            raise ValueError(f"bootstrap_ports must be a list of ports, not {self.bootstrap_ports!r}")
        if self.bootstrap_ports and self.engine != "sglang":
            raise ValueError("--bootstrap-port only applies to --engine sglang")
        if self.bootstrap_ports and len(self.bootstrap_ports) not in (1, len(self.prefill)):
            raise ValueError(f"give one --bootstrap-port for all prefill workers or one per --prefill worker "
                             f"({len(self.prefill)}), not {len(self.bootstrap_ports)}")
        for port in self.bootstrap_ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"--bootstrap-port must be a TCP port in 1..65535, not {port!r}")
        if self.engine == "sglang" and self.balanced_pd_share > 0:
            raise ValueError("balanced_pd_share needs the vLLM ampd connector's token-range prefill; "
                             "SGLang's PD wire has no such request (use --engine vllm or leave it at 0)")
        if not 0.0 <= self.balanced_pd_share < 1.0:
            raise ValueError("balanced_pd_share must be in [0, 1)")
        if self.residency_ttl_s is not None and self.residency_ttl_s < 0:
            raise ValueError("residency_ttl_s must be >= 0 seconds")
        if not 0 < self.refit_max_step < 1 or self.refit_min_samples < 1 or self.refit_interval_s < 0:
            raise ValueError("refit_max_step must be in (0, 1), refit_min_samples >= 1, refit_interval_s >= 0")
        if isinstance(self.health_slow_checks, bool) or not isinstance(self.health_slow_checks, int) \
                or self.health_slow_checks < 1:
            raise ValueError(f"health_slow_checks must be an integer >= 1, not {self.health_slow_checks!r}")
        if self.session_wait_s < 0:
            raise ValueError("session_wait_s must be >= 0 seconds")
        if self.ttft_slo <= 0 or self.itl_slo <= 0:
            raise ValueError("SLOs must be positive seconds")
        from ampd_plugin.router.limits import MAX_ENCODABLE_DEPTH

        if not 2 <= self.max_json_depth <= MAX_ENCODABLE_DEPTH:
            raise ValueError(f"max_json_depth must be in 2..{MAX_ENCODABLE_DEPTH} (what the router can re-encode)")
        for name in ("max_header_bytes", "max_headers", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.client_header_timeout_s <= 0 or self.client_body_timeout_s <= 0:
            raise ValueError("client timeouts must be positive seconds")
        if self.state:
            from ampd_plugin.router.redis_store import check_url

            check_url(self.state)
            if not 1 <= self.state_lock_ttl_s <= 3600:
                raise ValueError("state_lock_ttl_s must be in 1..3600 seconds")
            if not self.state_prefix or any(c in self.state_prefix for c in " \t\r\n"):
                raise ValueError("state_prefix must be a non-empty word")

    def prefill_bootstrap_ports(self) -> list[int]:
        """One bootstrap port per prefill worker (SGLang): as given, one value for all, or SGLang's default."""
        from ampd_plugin.connector.sglang.wire import SGLANG_DEFAULT_BOOTSTRAP_PORT

        ports = self.bootstrap_ports or [SGLANG_DEFAULT_BOOTSTRAP_PORT]
        return ports * len(self.prefill) if len(ports) == 1 else list(ports)

    def redacted(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data.get("api_key"):
            data["api_key"] = "***"
        if data.get("state"):
            from ampd_plugin.router.redis_store import redacted_url

            data["state"] = redacted_url(data["state"])
        return data
