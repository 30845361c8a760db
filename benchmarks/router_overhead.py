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

        names = list(targets)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for stream in (False, True):
                for c in args.concurrency:
                    for name in order:
                        r = uvloop.run(run_point(targets[name], stream, c, args.requests, args.warmup))
                        r.update(target=name, rep=rep, stream=stream, concurrency=c)
                        results.append(r)
                        print(f"rep {rep} {'stream' if stream else 'json  '} c={c:<3} {name:<12} "
                              f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  {r['req_s']:8.0f} req/s  "
                              f"errors {r['errors']}", flush=True)
    finally:
        for p in procs:
            with_pg = os.getpgid(p.pid) if p.poll() is None else None
            if with_pg is not None:
                os.killpg(with_pg, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)

    summary = summarize(results, list(targets))
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary,
                                               "tokenizer": tokenizer, "pinned": two_cores}, indent=1))
    print(f"(process logs in {logdir})")
    return 0


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
