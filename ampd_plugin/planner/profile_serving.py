"""The serving-path terms of `ampd-plugin profile`, measured directly and through the router.

Why through the router: the simulator charges each round the router's hop, the second HTTP call of a remote
round and the history export, none of which a direct engine measurement contains. So the profile starts
the router itself (`ampd-plugin route`, 127.0.0.1, a free port, stopped by PID) on the endpoints it profiles
and times the same rounds through it:

- **front end** (direct): bursts of k concurrent one-token requests; the engine runs each burst in one or two
  steps, so the makespan grows by the API server's per-request service time: slope of makespan over k;
- **router hop** (router, `colocated`, no connector): paired TTFTs of the same (history, increment) shapes
  through the router and directly; median difference;
- **remote call and history export** (router, `disagg` with the `ampd` connector, two endpoints): round 1 of
  a session (P prefills, D reads) and round 2 (P asks D to export the history first). The simulator,
  given every other term, predicts both rounds at zero load; what it misses is `remote_s` (round 1) and
  `export_s` (round 2 beyond round 1). Fitting through the simulator keeps profile and simulation consistent
  by construction.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ampd_plugin.planner.serving import ServingTerms

BURSTS = (1, 4, 8, 16)


async def measure_frontend(engine, fresh: Callable[[int], list[int]], repeats: int) -> list[tuple[int, float]]:
    """(k, makespan of k concurrent one-token requests) per burst size: the fastest of the repeats (noise on
    a shared host only ever adds time), after one discarded warm-up burst."""
    await asyncio.gather(*(engine.complete(fresh(8), 1) for _ in range(max(BURSTS))))
    out = []
    for k in BURSTS:
        times = []
        for _ in range(max(repeats, 3)):
            t0 = time.perf_counter()
            await asyncio.gather(*(engine.complete(fresh(8), 1) for _ in range(k)))
            times.append(time.perf_counter() - t0)
        out.append((k, min(times)))
    return out


def fit_frontend(samples: Sequence[tuple[int, float]]) -> float:
    """Per-request service time: the non-negative slope of makespan over burst size."""
    from scipy.optimize import nnls

    if len(samples) < 2:
        raise ValueError("fit_frontend needs at least two burst sizes")
    rows = np.array([[1.0, k] for k, _ in samples], dtype=float)
    y = np.array([t for _, t in samples], dtype=float)
    return float(nnls(rows, y)[0][1])


class RouterProcess:
    """`ampd-plugin route` on 127.0.0.1 for the duration of a `with` block (stopped by its PID)."""

    def __init__(self, args: Sequence[str], log_dir: Path, name: str) -> None:
        from ampd_plugin.localcluster import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        self.argv = [sys.executable, "-m", "ampd_plugin.cli", "route", *args, "--host", "127.0.0.1",
                     "--port", str(self.port), "--log-level", "warning"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RouterProcess":
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                tail = self.log.read_text()[-1500:] if self.log.exists() else ""
                raise RuntimeError(f"the router for profiling did not become healthy; log {self.log}:\n{tail}")
            time.sleep(0.5)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def measure_router_local(direct, via, fresh, shapes: Sequence[tuple[int, int]], repeats: int,
                               session: Callable[[], str]) -> list[tuple[int, int, float, float]]:
    """(hist, incr, direct TTFT, router TTFT) pairs: round 2 of a session, history cached on the worker."""
    out = []
    for hist, incr in shapes:
        for _ in range(max(repeats, 3)):
            ids = fresh(hist + incr)
            if hist:
                await direct.complete(ids[:hist], 1)
            t_direct = (await direct.stream(ids, 1))[0]
            ids = fresh(hist + incr)
            headers = {"X-Session-ID": session()}
            if hist:
                await via.complete(ids[:hist], 1, headers=headers)
            t_router = (await via.stream(ids, 1, headers=headers))[0]
            out.append((hist, incr, t_direct, t_router))
    return out


async def measure_router_remote(via, fresh, shapes: Sequence[tuple[int, int]], repeats: int,
                                session: Callable[[], str]) -> list[tuple[int, int, float, float]]:
    """(first prompt, increment, round-1 TTFT, round-2 TTFT) through a `disagg` router with the connector.

    Round 1 is a one-token request (its latency is its TTFT) that returns the generated token id, so round 2's
    prompt extends round 1's exactly (prompt + output + increment) and the router reuses the history."""
    out = []
    for first, incr in shapes:
        for _ in range(max(repeats, 3)):
            headers = {"X-Session-ID": session()}
            ids = fresh(first)
            t0 = time.perf_counter()
            body = await via.complete(ids, 1, headers=headers,
                                      extra={"logprobs": 0, "return_tokens_as_token_ids": True})
            t1 = time.perf_counter() - t0
            token = _generated_id(body)
            if token is None:
                raise ValueError("the router's answer carries no generated token id (return_tokens_as_token_ids)")
            t2 = (await via.stream(ids + [token] + fresh(incr), 1, headers=headers))[0]
            out.append((first, incr, t1, t2))
    return out


def _generated_id(body: dict) -> int | None:
    try:
        token = body["choices"][0]["logprobs"]["tokens"][0]
        return int(str(token).split(":", 1)[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def fit_router_hop(pairs: Sequence[tuple[int, int, float, float]]) -> float:
    """Per shape, the fastest router TTFT minus the fastest direct one (noise only adds); median over shapes."""
    shapes: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
    for h, i, d, r in pairs:
        shapes.setdefault((h, i), ([], []))
        shapes[(h, i)][0].append(d)
        shapes[(h, i)][1].append(r)
    return max(0.0, float(statistics.median(min(r) - min(d) for d, r in shapes.values())))


def fit_remote(cost_model, terms: ServingTerms, samples: Sequence[tuple[int, int, float, float]]) -> tuple[float, float]:
    """(remote_s, export_s): the zero-load simulation of each measured session with every other term, and
    the median of what it leaves unexplained (round 1: the remote call; round 2 beyond it: the export)."""
    from ampd_plugin.planner.simulate import Deployment, Pool, simulate
    from ampd_plugin.costmodel import Layout
    from ampd_plugin.workload import Round, Session

    base = terms.replace(remote_s=0.0, export_s=0.0)
    miss1, miss2 = [], []
    for first, incr, t1, t2 in samples:
        sess = Session("profile", 0.0, [Round(first, 1, 0.0), Round(incr, 1, 0.0)])
        recs = simulate(Deployment(Pool(1, Layout()), Pool(1, Layout())), [sess], "disagg", cost_model,
                        ttft_slo=60.0, itl_slo=60.0, serving=base).records
        miss1.append(t1 - recs[0].ttft)
        miss2.append(t2 - recs[1].ttft)
    remote = max(0.0, float(min(miss1)))  # the fastest: a shared host's noise only adds time
    export = max(0.0, float(min(miss2)) - remote)
    return remote, export


def provisional_profile(model) -> Path:
    """The model fitted so far, as a YAML file the profiling router can load (`--profile`)."""
    fd, name = tempfile.mkstemp(prefix="ampd-profile-", suffix=".yaml")
    os.close(fd)
    model.to_yaml(name)
    return Path(name)
