"""What the AMPD router costs: added latency and saturation throughput against a fast mock engine,
compared in the same run with calling the mock directly and with vLLM's Rust `vllm-router`.

    python benchmarks/router_overhead.py [--requests 1000] [--reps 3] [--vllm-router PATH] [--json OUT]

Layout (like shared/reference/router_anchor.md, "pinned"): the load client runs on CPU 0; the mock engine
and every router run on CPU 1, so "req/s at saturation" is what one core of router + mock sustains, and
added latency is paired per repetition (target p50 minus direct p50 measured seconds apart).
Targets: direct (the mock); ours-local (policy colocated: one upstream call per request, comparable with
vllm-router round_robin; exact token counting with the tiny test model's real tokenizer); ours-local-est
(the same without a tokenizer: ~4 bytes/token estimate, i.e. the relay alone); ours-disagg (policy
disagg: a prefill call on P then the decode call on D, two upstream calls); vllm-router (round_robin).
Our routers log a decision line per round at INFO (the default) and run with admission control off.
Goals from the issue: ≤ 1 ms p50 added; ≥ 0.5× vllm-router's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ampd_plugin.localcluster import free_port

MODEL = "mock-model"
N_TOKENS = 16


# ------------------------------------------------------------------------------------------ mock engine
def serve_mock(port: int) -> None:
    """A fast OpenAI-style engine: precomputed bodies, 16 one-token SSE chunks written back to back."""
    import uvloop
    from aiohttp import web

    def ev(obj) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    chat_stream = [ev({"id": "c", "object": "chat.completion.chunk", "model": MODEL,
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    chat_stream += [ev({"id": "c", "object": "chat.completion.chunk", "model": MODEL,
                        "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]})
                    for i in range(N_TOKENS)]
    chat_stream.append(b"data: [DONE]\n\n")
    chat_json = json.dumps({"id": "c", "object": "chat.completion", "model": MODEL,
                            "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": "".join(f" tok{i}" for i in range(N_TOKENS))},
                                         "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 250, "completion_tokens": N_TOKENS, "total_tokens": 266}}).encode()
    one_json = json.dumps({"id": "c", "object": "chat.completion", "model": MODEL,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok0"},
                                        "finish_reason": "length"}],
                           "usage": {"prompt_tokens": 250, "completion_tokens": 1, "total_tokens": 251},
                           "kv_transfer_params": None}).encode()

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stream = b'"stream":true' in body or b'"stream": true' in body
        if b'"max_tokens":1,' in body or b'"max_tokens":1}' in body:
            return web.Response(body=one_json, content_type="application/json")
        if not stream:
            return web.Response(body=chat_json, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chat_stream:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 32768}]})

    async def ok(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", ok)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------------------------ processes


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    if cpu is not None and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)] + cmd
    return cmd


def wait_ready(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def points(names: list[str], reps: int, concurrency: list[int]):
    """(rep, stream, c, target) in the benchmark's order: each repetition rotates the targets, so none is
    always measured first (or last) on a drifting machine."""
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for stream in (False, True):
            for c in concurrency:
                for name in order:
                    yield rep, stream, c, name


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is still running after 10 s."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


# ------------------------------------------------------------------------------------------ load client
async def run_point(url: str, stream: bool, concurrency: int, n: int, warmup: int) -> dict:
    import aiohttp

    body = json.dumps({"model": MODEL, "max_tokens": N_TOKENS, "stream": stream, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": ("The quick brown fox jumps over the lazy dog. " * 23)[:1000]}]}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    ttfc: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def one(record: bool) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            first = None
            try:
                async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                    if stream:
                        events = 0
                        async for chunk in r.content.iter_any():
                            if first is None and chunk:
                                first = time.perf_counter()
                            events += chunk.count(b"data: ")
                        ok = r.status == 200 and events == N_TOKENS + 2
                    else:
                        data = await r.read()
                        ok = r.status == 200 and b'"choices"' in data
            except Exception:
                ok = False
            t1 = time.perf_counter()
            if not ok:
                errors += 1
            elif record:
                latencies.append(t1 - t0)
                if first is not None:
                    ttfc.append(first - t0)

        async def worker(count: int, record: bool) -> None:
            for _ in range(count):
                await one(record)

        await asyncio.gather(*(worker(warmup // concurrency + 1, False) for _ in range(concurrency)))
        import gc

        gc.disable()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency, True) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        gc.enable()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else None,
        "ttfc_p50_ms": statistics.median(ttfc) * 1e3 if ttfc else None,
        "req_s": len(latencies) / wall if wall > 0 else 0.0,
        "ok": len(latencies),
        "errors": errors,
    }


async def run_sessions(urls: list[str], stream: bool, concurrency: int, n: int, warmup: int, tag: str,
                       rounds: int = 8, alternate: bool = False) -> dict:
    """Multi-round sessions: each client coroutine runs conversations of `rounds` rounds (each round adds a
    ~300-character user turn to the history it got back). Client w sends its rounds to ``urls[w % len]``
    (a connection-level balancer: a client's keep-alive connection stays on one replica); with `alternate`,
    round k goes to ``urls[k % len]`` instead, so every round lands on the other replica than the one
    before (the worst case: each round finds its history only through the record in Redis, and renders
    and counts its whole prompt again)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency * len(urls))
    turn = ("The tool returned another batch of results; compare them with the earlier ones and say what "
            "changed. " * 3)[:300]

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def conversation(w: int, sid: str, count: int, record: bool) -> int:
            nonlocal errors
            messages = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": turn}]
            for k in range(min(rounds, count)):
                body = json.dumps({"model": MODEL, "max_tokens": N_TOKENS, "stream": stream,
                                   "messages": messages}).encode()
                headers = {"Content-Type": "application/json", "X-Session-ID": sid}
                t0 = time.perf_counter()
                text = None
                try:
                    async with session.post(urls[(k if alternate else w) % len(urls)] + "/v1/chat/completions", data=body,
                                            headers=headers) as r:
                        if stream:
                            raw = await r.read()
                            if r.status == 200 and raw.count(b"data: ") == N_TOKENS + 2:
                                text = "".join(f" tok{i}" for i in range(N_TOKENS))
                        else:
                            data = await r.json(content_type=None)
                            if r.status == 200:
                                text = data["choices"][0]["message"]["content"]
                except Exception:
                    text = None
                t1 = time.perf_counter()
                if text is None:
                    errors += 1
                    return k + 1
                if record:
                    latencies.append(t1 - t0)
                messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": turn}]
            return min(rounds, count)

        async def worker(w: int, count: int, record: bool) -> None:
            i = 0
            while count > 0:
                count -= await conversation(w, f"{tag}-{'m' if record else 'w'}{w}-{i}", count, record)
                i += 1

        await asyncio.gather(*(worker(w, warmup // concurrency + 1, False) for w in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w, n // concurrency, True) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3 if latencies else None,
        "req_s": len(latencies) / wall if wall > 0 else 0.0,
        "ok": len(latencies),
        "errors": errors,
    }


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve-mock", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--vllm-router", default=shutil.which("vllm-router") or "/tmp/vrouter-venv/bin/vllm-router",
                    help="path of the vllm-router binary (pip install vllm-router); skipped when missing")
    ap.add_argument("--tokenizer", default="auto", help="'auto' (tiny test model's tokenizer), a dir, or 'none'")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--replicas", action="store_true",
                    help="instead: one router vs one and two replicas sharing a real Redis (--state), "
                         "multi-round sessions, each replica under the same CPU quota")
    ap.add_argument("--replica-cpu", type=float, default=0.45,
                    help="--replicas: each replica's CPU quota in cores (cgroup v1 cpu controller; needs root)")
    args = ap.parse_args()
    if args.serve_mock:
        serve_mock(args.serve_mock)
        return 0

    two_cores = (os.cpu_count() or 1) >= 2
    server_cpu, client_cpu = (1, 0) if two_cores else (None, None)
    tokenizer = None
    if args.tokenizer == "auto":
        try:
            from ampd_plugin.tiny_model import build_tiny_model

            tokenizer = str(build_tiny_model())
        except Exception as exc:  # the benchmark still runs, with estimated token counts
            print(f"(no tiny-model tokenizer: {exc}; our router estimates token counts)")
    elif args.tokenizer != "none":
        tokenizer = args.tokenizer

    if args.replicas:
        return run_replicas(args, tokenizer)
    logdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> None:
        log = open(logdir / f"{name}.log", "w")
        procs.append(subprocess.Popen(pinned(cmd, server_cpu), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    mock_port = free_port()
    start("mock", [sys.executable, __file__, "--serve-mock", str(mock_port)])
    mock = f"http://127.0.0.1:{mock_port}"
    wait_ready(mock + "/health")
    targets = {"direct": mock}
    # Admission control off: the router's prefill queues hold work back by design (one prefill in flight per
    # worker), which against a mock measures queueing, not the relay; the queues are measured in the load test.
    cfg = logdir / "router.yaml"
    cfg.write_text("local_prefill_slots: 1024\nprefill_slots: 1024\n")
    ampd = [sys.executable, "-m", "ampd_plugin.cli", "route", "--host", "127.0.0.1", "--log-level", "info",
            "--config", str(cfg)]
    tok = ["--tokenizer", tokenizer] if tokenizer else []
    for name, extra in (("ours-local", tok + ["--decode", mock, "--policy", "colocated"]),
                        ("ours-local-est", ["--decode", mock, "--policy", "colocated"]),
                        ("ours-disagg", tok + ["--prefill", mock, "--decode", mock, "--policy", "disagg"])):
        if name == "ours-local-est" and not tokenizer:
            continue
        port = free_port()
        start(name, ampd + extra + ["--port", str(port)])
        targets[name] = f"http://127.0.0.1:{port}"
    if args.vllm_router and os.path.exists(args.vllm_router):
        port, prom = free_port(), free_port()
        start("vllm-router", [args.vllm_router, "--worker-urls", mock, "--policy", "round_robin", "--host", "127.0.0.1",
                              "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
                              "--worker-startup-check-interval", "1"])
        targets["vllm-router"] = f"http://127.0.0.1:{port}"
    else:
        print(f"(vllm-router not found at {args.vllm_router}; its rows are skipped)")

    results: list[dict] = []
    try:
        for name, url in targets.items():
            wait_ready(url + ("/health" if name != "vllm-router" else "/health"), timeout=120)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        import uvloop

        for rep, stream, c, name in points(list(targets), args.reps, args.concurrency):
            r = uvloop.run(run_point(targets[name], stream, c, args.requests, args.warmup))
            r.update(target=name, rep=rep, stream=stream, concurrency=c)
            results.append(r)
            print(f"rep {rep} {'stream' if stream else 'json  '} c={c:<3} {name:<12} "
                  f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['req_s']:8.0f} req/s  "
                  f"errors {r['errors']}", flush=True)
    finally:
        stop_processes(procs)

    summary = summarize(results, list(targets))
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary,
                                               "tokenizer": tokenizer, "pinned": two_cores}, indent=1))
    print(f"(process logs in {logdir})")
    return 0


# ------------------------------------------------------------------------------------------ replicas
class CpuQuota:
    """A cgroup-v1 CPU quota of `cores` for the processes put in it: each replica gets the same fixed budget,
    so "two replicas vs one" measures how replicas scale, not how two processes share one core."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, name: str, cores: float) -> None:
        self.path = self.ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "cpu.cfs_period_us").write_text("100000")
        (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass

    @classmethod
    def available(cls) -> bool:
        return (cls.ROOT / "cpu.cfs_quota_us").exists() and os.access(cls.ROOT, os.W_OK)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# target -> router processes. "two" (two routers that share nothing, each client on one) is the control: what
# two processes under their quotas on this box sustain at best, whatever Redis does.
REPLICA_TARGETS = {"one": 1, "two": 2, "one-redis": 1, "two-redis": 2, "two-redis-alt": 2}


def run_replicas(args, tokenizer: str | None) -> int:
    """One router without state, one replica with `--state`, two replicas with `--state` (rounds alternating
    between them), all behind the same mock. Client, mock and Redis on CPU 0; the routers on CPU 1, each
    under a `--replica-cpu` quota."""
    import uvloop

    from ampd_plugin.local_redis import RedisServer

    if (os.cpu_count() or 1) < 2:
        print("--replicas needs 2 CPUs (client + mock + Redis on one, the replicas on the other)")
        return 2
    if 2 * args.replica_cpu > 1.0:
        print("--replica-cpu must be at most 0.5: two replicas share CPU 1")
        return 2
    if not CpuQuota.available():
        print("--replicas needs the cgroup v1 cpu controller writable (run as root); without per-replica quotas "
              "two replicas would just share one core")
        return 2
    logdir = Path(tempfile.mkdtemp(prefix="router-replicas-"))
    procs: list[subprocess.Popen] = []
    quotas: list[CpuQuota] = []
    redis_srv = RedisServer()
    pids: dict[str, list[int]] = {}
    urls: dict[str, list[str]] = {}
    results: list[dict] = []
    try:
        os.sched_setaffinity(0, {0})
        log = open(logdir / "mock.log", "w")
        mock_port = free_port()
        procs.append(subprocess.Popen(pinned([sys.executable, __file__, "--serve-mock", str(mock_port)], 0),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        mock = f"http://127.0.0.1:{mock_port}"
        wait_ready(mock + "/health")
        redis_srv.start()
        os.sched_setaffinity(redis_srv.proc.pid, {0})
        tok = ["--tokenizer", tokenizer] if tokenizer else []
        for target, n_proc in REPLICA_TARGETS.items():
            cfg = logdir / f"{target}.yaml"
            cfg.write_text("local_prefill_slots: 1024\nprefill_slots: 1024\n"
                           + (f"state_prefix: bench-{target}\n" if "redis" in target else ""))
            for i in range(n_proc):
                port = free_port()
                cmd = [sys.executable, "-m", "ampd_plugin.cli", "route", "--host", "127.0.0.1", "--port", str(port),
                       "--log-level", "info", "--config", str(cfg), "--decode", mock, "--policy", "colocated", *tok]
                if "redis" in target:
                    cmd += ["--state", redis_srv.url, "--replica-id", f"{target}-{i}"]
                out = open(logdir / f"{target}-{i}.log", "w")
                proc = subprocess.Popen(pinned(cmd, 1), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                procs.append(proc)
                quota = CpuQuota(f"ampd-bench-{os.getpid()}-{target}-{i}", args.replica_cpu)
                quota.add(proc.pid)
                quotas.append(quota)
                pids.setdefault(target, []).append(proc.pid)
                urls.setdefault(target, []).append(f"http://127.0.0.1:{port}")
        for target_urls in urls.values():
            for url in target_urls:
                wait_ready(url + "/health", timeout=120)
        for rep, stream, c, name in points(list(REPLICA_TARGETS), args.reps, args.concurrency):
            before = [cpu_seconds(p) for p in pids[name]], cpu_seconds(redis_srv.proc.pid)
            r = uvloop.run(run_sessions(urls[name], stream, c, args.requests, args.warmup,
                                        tag=f"{name}-r{rep}-{int(stream)}-c{c}",
                                        alternate=name.endswith("-alt")))
            # CPU per measured round (warm-up rounds included in the counters: a small overcount)
            rounds = max(1, r["ok"] + args.warmup)
            r["router_cpu_us"] = sum(cpu_seconds(p) - b for p, b in zip(pids[name], before[0])) / rounds * 1e6
            r["redis_cpu_us"] = (cpu_seconds(redis_srv.proc.pid) - before[1]) / rounds * 1e6
            r.update(target=name, rep=rep, stream=stream, concurrency=c)
            results.append(r)
            print(f"rep {rep} {'stream' if stream else 'json  '} c={c:<3} {name:<13} "
                  f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['req_s']:7.0f} req/s  "
                  f"router {r['router_cpu_us']:5.0f} us/round  redis {r['redis_cpu_us']:4.0f} us/round  "
                  f"errors {r['errors']}", flush=True)
    finally:
        stop_processes(procs)
        redis_srv.stop()
        for q in quotas:
            q.remove()
    rows = summarize_replicas(results)
    print(f"\nmedian over {args.reps} reps; each replica under a {args.replica_cpu:g}-core quota; "
          "ratios and added p50 paired per rep against one-redis")
    print(f"{'mode':<7}{'c':>4}  {'target':<13}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'req/s':>8}"
          f"{'× one-redis':>13}{'× one':>8}{'× two':>8}{'router us':>11}{'redis us':>10}{'errors':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{'stream' if r['stream'] else 'json':<7}{r['concurrency']:>4}  {r['target']:<13}"
              f"{fmt(r['p50_ms'], '9.3f')}{fmt(r['p99_ms'], '9.3f')}{fmt(r['added_p50_ms'], '11.3f')}"
              f"{r['req_s']:8.0f}{fmt(r['x_one_redis'], '13.2f')}{fmt(r['x_one'], '8.2f')}{fmt(r['x_two'], '8.2f')}"
              f"{r['router_cpu_us']:11.0f}{r['redis_cpu_us']:10.0f}{r['errors']:8d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": rows, "tokenizer": tokenizer,
                                               "replica_cpu": args.replica_cpu}, indent=1))
    print(f"(process logs in {logdir})")
    return 0


def summarize_replicas(results: list[dict]) -> list[dict]:
    rows = []
    for stream in (False, True):
        for c in sorted({r["concurrency"] for r in results}):
            point = [r for r in results if r["stream"] == stream and r["concurrency"] == c]
            by = {t: {r["rep"]: r for r in point if r["target"] == t} for t in REPLICA_TARGETS}

            def paired(t: str, base: str, f) -> float | None:
                vals = [f(r, by[base][rep]) for rep, r in by[t].items() if rep in by[base]]
                return statistics.median(vals) if vals else None

            for t in REPLICA_TARGETS:
                mine = list(by[t].values())
                rows.append({
                    "stream": stream, "concurrency": c, "target": t,
                    "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                    "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                    "added_p50_ms": paired(t, "one-redis", lambda a, b: a["p50_ms"] - b["p50_ms"]),
                    "req_s": statistics.median(r["req_s"] for r in mine),
                    "x_one_redis": paired(t, "one-redis", lambda a, b: a["req_s"] / b["req_s"]),
                    "x_one": paired(t, "one", lambda a, b: a["req_s"] / b["req_s"]),
                    "x_two": paired(t, "two", lambda a, b: a["req_s"] / b["req_s"]),
                    "router_cpu_us": statistics.median(r["router_cpu_us"] for r in mine),
                    "redis_cpu_us": statistics.median(r["redis_cpu_us"] for r in mine),
                    "errors": sum(r["errors"] for r in mine),
                })
    return rows


def summarize(results: list[dict], targets: list[str]) -> list[dict]:
    rows = []
    for stream in (False, True):
        for c in sorted({r["concurrency"] for r in results}):
            point = [r for r in results if r["stream"] == stream and r["concurrency"] == c]
            direct = {r["rep"]: r for r in point if r["target"] == "direct"}
            vr = {r["rep"]: r for r in point if r["target"] == "vllm-router"}
            for t in targets:
                mine = [r for r in point if r["target"] == t]
                added = [r["p50_ms"] - direct[r["rep"]]["p50_ms"] for r in mine if r["rep"] in direct]
                added99 = [r["p99_ms"] - direct[r["rep"]]["p99_ms"] for r in mine if r["rep"] in direct]
                ratio_vr = [r["req_s"] / vr[r["rep"]]["req_s"] for r in mine if r["rep"] in vr and vr[r["rep"]]["req_s"]]
                rows.append({
                    "stream": stream, "concurrency": c, "target": t,
                    "p50_ms": statistics.median(r["p50_ms"] for r in mine),
                    "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                    "added_p50_ms": statistics.median(added) if added else None,
                    "added_p99_ms": statistics.median(added99) if added99 else None,
                    "req_s": statistics.median(r["req_s"] for r in mine),
                    "x_vllm_router": statistics.median(ratio_vr) if ratio_vr else None,
                    "errors": sum(r["errors"] for r in mine),
                })
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\nmedian over reps; added = paired (target − direct) per rep")
    print(f"{'mode':<7}{'c':>4}  {'target':<12}{'p50 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}"
          f"{'req/s':>9}{'× vllm-router':>15}{'errors':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{'stream' if r['stream'] else 'json':<7}{r['concurrency']:>4}  {r['target']:<12}"
              f"{fmt(r['p50_ms'], '9.3f')}{fmt(r['p99_ms'], '9.3f')}{fmt(r['added_p50_ms'], '11.3f')}"
              f"{fmt(r['added_p99_ms'], '11.3f')}{r['req_s']:9.0f}{fmt(r['x_vllm_router'], '15.2f')}{r['errors']:8d}")


if __name__ == "__main__":
    sys.exit(main())
