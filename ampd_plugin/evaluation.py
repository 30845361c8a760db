"""One measured run of one deployment on the CPU testbed, shared by `ampd-plugin demo` and
`benchmarks/testbed_eval.py`: engines per connector kind, the router in front, the multi-round load, and
the engines' own counters of what was computed where and which KV moved.

Deployments (all on the same two vLLM-CPU processes per connector kind, worker 0 on core 0, worker 1 on
core 1, caches reset before each run, the same workload, seed and prompt text):
- a router policy spec (`ampd`, `ampd*`, `dynamo`, `llmd`, `disagg`, `NAME:param=value:...`): engines with the
  `ampd` connector, `ampd-plugin route` with worker 0 as prefill and worker 1 as decode worker;
- `colocated`: the same engines as two independent replicas behind the router's session affinity, the
  router without a KV connector (`--kv-connector none`): nothing moves between workers;
- `vllm-today`: engines with vLLM's in-tree MooncakeConnector and the real `vllm-router` in PD mode, every
  round prefilled on worker 0 (`baselines_deploy`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ampd_plugin import localcluster as lc

# The demo's model and load, chosen so that the trade-offs show on two CPU cores (docs/demo.md explains).
DEMO_MODEL = dict(hidden_size=768, num_layers=6, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                  max_position_embeddings=16384)
DEMO_WORKLOAD = dict(workload="toolbench", input_scale=1.0, output_scale=1.0, max_rounds=6)
DEMO_TTFT_SLO, DEMO_ITL_SLO, DEMO_SLO_TARGET = 2.0, 0.03, 0.9
DEMO_RATE = 0.8  # sessions/s
# `ampd` is the paper's policy; `ampd*` adds this project's improvements (predictive slack, ITL-aware local
# gate). The documented baselines get vLLM-CPU's KV block size (128 tokens) for their prefix-overlap rules.
POLICY_ALIASES = {"ampd*": "ampd:predictive=true:itl_aware=true", "dynamo": "dynamo:block_size=128",
                  "llmd": "llmd:block_size=128"}
VLLM_TODAY = "vllm-today"  # not a router policy: vLLM's in-tree MooncakeConnector + vllm-router
ROUTER_START_TIMEOUT_S = 60
SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
# A percentile bootstrap over fewer pairs is little more than their range: no verdict below this many.
MIN_PAIRS = 5


def connector_kind(spec: str) -> str:
    """Which engines a deployment needs: "mooncake" (in-tree connector) for vllm-today, else "ampd"."""
    return "mooncake" if spec == VLLM_TODAY else "ampd"


def kv_bytes_per_token(model: dict = DEMO_MODEL) -> int:
    """K and V of every layer in bf16 for one token."""
    return 2 * model["num_layers"] * model["num_kv_heads"] * (model["hidden_size"] // model["num_heads"]) * 2


def _post(url: str, body: dict, timeout_s: float = 120.0) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        resp.read()


def warm_up(url: str) -> None:
    """One short request so the first timed round does not pay vLLM's first-request cost."""
    _post(url + "/v1/completions", {"prompt": "warm up " * 20, "max_tokens": 8, "ignore_eos": True, "temperature": 0})


def _slug(policy: str) -> str:
    return policy.replace(":", "_").replace("=", "-")


def split_policy_spec(spec: str) -> tuple[str, list[str]]:
    """`ampd:itl_aware=true:predictive=true` -> ("ampd", ["itl_aware=true", "predictive=true"]).

    Lets the demo compare a policy with its options (the router's `--param NAME=VALUE`) side by side.
    """
    name, *params = POLICY_ALIASES.get(spec, spec).split(":")
    return name, params


class RouterProcess:
    """`ampd-plugin route` as a child process in its own process group (stopped by its PID)."""

    def __init__(self, policy: str, prefill: list[str], decode: list[str], port: int, log_path: Path,
                 ttft_slo: float, itl_slo: float, kv_connector: str = "ampd", extra: tuple[str, ...] = ()) -> None:
        name, params = split_policy_spec(policy)
        argv = [sys.executable, "-m", "ampd_plugin.cli", "route", "--policy", name, "--kv-connector", kv_connector,
                *extra,
                "--ttft-slo", str(ttft_slo), "--itl-slo", str(itl_slo), "--host", "127.0.0.1", "--port", str(port)]
        for param in params:
            argv += ["--param", param]
        for url in prefill:
            argv += ["--prefill", url]
        for url in decode:
            argv += ["--decode", url]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self._log.write(" ".join(argv) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = ROUTER_START_TIMEOUT_S) -> None:
        from ampd_plugin.localcluster import is_healthy, log_tail

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}; log {self.log_path}:\n{log_tail(self.log_path, 30)}")
            if is_healthy(self.url):
                return
            time.sleep(0.5)
        raise TimeoutError(f"router not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{log_tail(self.log_path, 30)}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def engine_kv_bytes(urls: list[str]) -> float | None:
    """KV bytes the workers' ampd connectors read from peers (pull model: every byte moved is read once)."""
    from ampd_plugin.localcluster import metric_sum, scrape_metrics

    try:
        return sum(metric_sum(scrape_metrics(u), "vllm:ampd_kv_read_bytes_total") for u in urls)
    except OSError:
        return None


def router_numbers(url: str) -> tuple[float | None, float | None]:
    """(local fraction of routed prefills, KV bytes moved) from the router's Prometheus /metrics."""
    from ampd_plugin.localcluster import metric_sum, scrape_metrics

    try:
        m = scrape_metrics(url, prefix="ampd_router_")
    except OSError:
        return None, None
    local = metric_sum(m, "ampd_router_routes_total", route="local")
    total = metric_sum(m, "ampd_router_routes_total")
    kv = metric_sum(m, "ampd_router_kv_bytes_moved_total")
    return (local / total if total else None), kv


# ------------------------------------------------------------------------------------------- engines
def start_engines(kind: str, model: Path, log_dir: Path, max_model_len: int = DEMO_MODEL["max_position_embeddings"]):
    """(workers [core 0, core 1], vllm-today deployment or None), healthy and warmed up."""
    common = dict(max_model_len=max_model_len, dev_mode=True)
    if kind == "mooncake":
        from ampd_plugin.baselines_deploy import start_engines as start_mooncake

        dep = start_mooncake(model, log_dir, **common)
        workers = dep.workers
    else:
        dep = None
        workers = [lc.start_vllm(model, name=f"worker{i}", log_dir=log_dir, cpu=i, ampd=True, **common) for i in range(2)]
        try:
            lc.wait_healthy(workers, timeout_s=420)
        except BaseException:
            lc.stop_all(workers)
            raise
    try:
        for w in workers:
            warm_up(w.url)
    except BaseException:
        dep.stop() if dep is not None else lc.stop_all(workers)
        raise
    return workers, dep


def engine_counters(urls: list[str]) -> dict:
    """Per worker: prompt tokens by source (computed / own prefix cache / through a KV connector) and the
    ampd connector's bytes read, from the engines' own /metrics."""
    out = {}
    for i, url in enumerate(urls):
        m = lc.scrape_metrics(url)
        out[f"worker{i}"] = {s: lc.metric_sum(m, "vllm:prompt_tokens_by_source_total", source=s) for s in SOURCES}
        out[f"worker{i}"]["ampd_kv_read_bytes"] = lc.metric_sum(m, "vllm:ampd_kv_read_bytes_total")
    return out


# ------------------------------------------------------------------------------------------- one run
@dataclass
class Run:
    policy: str
    rate: float
    seed: int
    attainment: float | None = None
    session_attainment: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    itl_p50: float | None = None
    itl_p95: float | None = None
    rounds: int = 0
    errors: int = 0
    local_fraction: float | None = None  # the router's own count; vllm-router: every round remote by design
    tokens: dict = field(default_factory=dict)  # worker -> source -> prompt tokens during this run
    kv_tokens_received: float | None = None  # Σ external_kv_transfer over both workers (engines' counters)
    ampd_kv_read_bytes: float | None = None  # the ampd connector's own byte counter (ampd engines only)
    router_kv_bytes_estimate: float | None = None  # the router's estimate (its /metrics)
    foreign_cores_max: float | None = None  # busiest window of other processes during this run
    failure: str = ""
    notes: str = ""

    @property
    def kv_bytes_moved(self) -> float | None:
        """Bytes the engines received through a connector (tokens × the demo model's KV bytes per token)."""
        return None if self.kv_tokens_received is None else self.kv_tokens_received * kv_bytes_per_token()


def run_one(spec: str, workers, dep, model: Path, rate: float, seed: int, sessions: int, out: Path,
            slo: dict, workload: dict = DEMO_WORKLOAD, samples: list | None = None, status=None) -> Run:
    """Reset both caches, start the deployment's router, play the load, read every counter, stop the router."""
    from ampd_plugin.loadtest_cli import LoadTestSpec, run_loadtest

    run = Run(spec, rate, seed)
    slug = f"{_slug(spec).replace('*', 'star')}-r{rate:g}-s{seed}"
    urls = [w.url for w in workers]
    for w in workers:
        try:
            if not lc.reset_prefix_cache(w.url):
                run.notes += f"{w.name}: prefix cache not reset; "
        except OSError as exc:
            run.notes += f"{w.name}: prefix-cache reset failed ({exc}); "
    before = engine_counters(urls)
    seen = len(samples) if samples is not None else 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    router = None
    try:
        if spec == VLLM_TODAY:
            host = dep.start_router(out / "logs").url
        else:
            colocated = split_policy_spec(spec)[0] == "colocated"
            prefill, decode = ([], urls) if colocated else (urls[:1], urls[1:])
            router = RouterProcess(spec, prefill, decode, lc.free_port(), out / "logs" / f"router-{slug}.log",
                                   slo["ttft_slo"], slo["itl_slo"], kv_connector="none" if colocated else "ampd",
                                   extra=("--tokenizer", str(model)))
            router.wait_ready()
            host = router.url
        if status is not None:
            status.update(f"[bold]{spec}[/]: {sessions} sessions at {rate:g}/s …")
        load = LoadTestSpec(host=host, sessions=sessions, session_rate=rate, seed=seed,
                            duration_s=sessions / rate + 180, report_dir=str(out / slug), model=str(model),
                            tokenizer=str(model), **workload, **slo)
        code, report = run_loadtest(load, quiet=True)
        if report is None:
            run.failure = f"load test wrote no report (exit {code})"
            return run
        s = report["summary"]
        run.attainment, run.session_attainment = s["slo_attainment"], report["session_attainment"]
        run.ttft_p50, run.ttft_p95, run.itl_p50, run.itl_p95 = s["ttft_p50"], s["ttft_p95"], s["itl_p50"], s["itl_p95"]
        run.rounds, run.errors = s["rounds"], s["errors"]
        if router is not None:
            run.local_fraction, run.router_kv_bytes_estimate = router_numbers(router.url)
        else:
            run.local_fraction = 0.0  # vllm-router PD mode sends every request to the prefill worker first
    except (RuntimeError, TimeoutError, OSError) as exc:
        run.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        if router is not None:
            router.stop()
        if dep is not None:
            dep.stop_router()
        try:
            after = engine_counters(urls)
        except OSError as exc:  # an engine died: the run's numbers cannot be trusted
            run.failure = run.failure or f"engine counters unreadable after the run: {exc}"
        else:
            run.tokens = {w: {k: after[w][k] - before[w][k] for k in SOURCES} for w in after}
            run.kv_tokens_received = sum(t["external_kv_transfer"] for t in run.tokens.values())
            run.ampd_kv_read_bytes = sum(after[w]["ampd_kv_read_bytes"] - before[w]["ampd_kv_read_bytes"] for w in after)
        if samples is not None and samples[seen:]:
            run.foreign_cores_max = max(samples[seen:])
    return run


# ------------------------------------------------------------------------------------------- statistics
def bootstrap_mean_ci(values, seed: int = 0) -> tuple[float, float | None, float | None]:
    """(mean, low, high): 95 % percentile bootstrap of the mean (10,000 resamples); no interval below 2 values."""
    import numpy as np
    from scipy.stats import bootstrap

    arr = np.asarray(list(values), dtype=float)
    mean = float(arr.mean())
    if len(arr) < 2:
        return mean, None, None
    if np.all(arr == arr[0]):
        return mean, mean, mean
    res = bootstrap((arr,), np.mean, confidence_level=0.95, n_resamples=10_000, method="percentile",
                    random_state=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def analyse(runs: list[Run], ours: tuple[str, ...]) -> dict:
    """Mean ± bootstrap per policy and rate; per rate and each of `ours`, the paired (same seed) differences
    against the baseline with the best mean at that rate."""
    import numpy as np

    ok = [r for r in runs if r.attainment is not None and not r.failure]
    rates = sorted({r.rate for r in ok})
    policies = list(dict.fromkeys(r.policy for r in ok))
    att = {p: {rate: {r.seed: r.attainment for r in ok if r.policy == p and r.rate == rate} for rate in rates}
           for p in policies}
    curves = {p: {f"{rate:g}": bootstrap_mean_ci(att[p][rate].values()) for rate in rates if att[p][rate]}
              for p in policies}
    baselines = [p for p in policies if p not in ours]
    paired = []
    for rate in rates:
        means = {b: float(np.mean(list(att[b][rate].values()))) for b in baselines if att[b][rate]}
        if not means:
            continue
        best = max(means, key=means.get)
        for mine in (p for p in ours if p in policies):
            seeds = sorted(set(att[mine][rate]) & set(att[best][rate]))
            diffs = [att[mine][rate][s] - att[best][rate][s] for s in seeds]
            if not diffs:
                continue
            mean, lo, hi = bootstrap_mean_ci(diffs)
            paired.append({"rate": rate, "ours": mine, "best_baseline": best, "n": len(diffs), "mean_diff": mean,
                           "ci_low": lo, "ci_high": hi, "diffs": diffs,
                           "significant": lo is not None and len(diffs) >= MIN_PAIRS and (lo > 0 or hi < 0)})
    return {"rates": rates, "curves": curves, "paired": paired}


def reading(p: dict) -> str:
    """One line saying what a paired difference means statistically."""
    head = f"{p['ours']} − {p['best_baseline']} (best baseline) at {p['rate']:g} sessions/s: {100 * p['mean_diff']:+.1f} points"
    if p["ci_low"] is None:
        return (f"{head} from a single run — no interval; the run-to-run spread on this testbed is about ±20 points, "
                f"so this says nothing yet (use several paired runs)")
    ci = f"95 % CI [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}] over {p['n']} paired runs"
    if p["n"] < MIN_PAIRS:
        return f"{head}, {ci}: too few pairs (< {MIN_PAIRS}) for the interval to support any verdict"
    if not p["significant"]:
        return f"{head}, {ci}: the interval includes 0, not a significant difference"
    return f"{head}, {ci}: significantly {'better' if p['ci_low'] > 0 else 'worse'}"
