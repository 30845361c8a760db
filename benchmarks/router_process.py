"""A real `ampd-plugin route` process for the fault benchmarks: start it, wait for it, read its RSS and
state sizes from outside, stop it by PID. Shared by faults.py (hostile input) and faults_soak.py."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
STATE = ("ampd_router_sessions", "ampd_router_bindings", "ampd_router_stored_prompt_chars", "ampd_router_rounds_in_flight")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def state_sizes(http: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """The router's table sizes from its /metrics (bindings summed over their `kind` label)."""
    try:
        async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    out = dict.fromkeys(STATE, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """`python -m ampd_plugin.cli route ARGS` in its own process group, output to `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "ampd_plugin.cli", "route", *args], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


async def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"router exited with {proc.returncode} before it was ready")
            try:
                async with http.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"router not ready after {timeout:g} s")


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM this PID, SIGKILL it after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
