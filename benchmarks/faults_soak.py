"""Soak: a real router process under a long multi-round load near its knee. Does it leak?

    python benchmarks/faults.py --soak MINUTES [--rate ROUNDS_PER_S] [--session-ttl S] [--json OUT]

A real `ampd-plugin route` (policy ampd) in front of one prefill and two decode fake engines
(tests/unit/router_fakes.py: exact, deterministic answers). First a closed-loop calibration (15 s; a tenth of a short soak) at
concurrency 32 measures what this box sustains; the soak then offers 80 % of that (the knee: busy, not
drowning) unless `--rate` says otherwise, as an open loop: multi-round conversations arrive as a Poisson
process, stream or not at random, and each round's answer must be the fake model's exact answer.

Every 10 s it samples the router's RSS and table sizes (GET /metrics). RSS growth is measured from the end
of the warm-up (the first fifth, at least one session TTL, when the session table reaches its steady size) to
the end. After the load it waits one session TTL plus two health ticks: every session, binding, stored prompt
and in-flight round must be gone. Exit code 1 on a failed round, RSS growth ≥ 5 %, or leftover state.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from ampd_plugin.localcluster import free_port
from router_fakes import MODEL, FakeEngine, answer_tokens, prompt_key
from router_process import rss_kib, spawn, state_sizes, stop, wait_ready

ROUNDS = 4  # per conversation
MAX_TOKENS = 8
SAMPLE_S = 10.0
MAX_OPEN = 512  # conversations in flight at most; arrivals beyond are counted as shed, not queued
CALIBRATE_S = 15.0  # at most; a short soak calibrates for a tenth of its length


@dataclass
class Tally:
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    shed: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds per round, this sample window

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1


async def conversation(http: aiohttp.ClientSession, url: str, sid: str, rng: random.Random, tally: Tally) -> None:
    msgs = [{"role": "user", "content": f"{sid}: " + "word " * rng.randrange(20, 200)}]
    for k in range(ROUNDS):
        stream = rng.random() < 0.5
        body = {"model": MODEL, "messages": msgs, "max_tokens": MAX_TOKENS, "stream": stream}
        want = "".join(answer_tokens(prompt_key(body), MAX_TOKENS))
        t0 = time.monotonic()
        try:
            async with http.post(url + "/v1/chat/completions", json=body, headers={"X-Session-ID": sid}) as r:
                if r.status != 200:
                    tally.fail(str(r.status))
                    return
                if stream:
                    parts = []
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            parts += [c.get("delta", {}).get("content") or "" for c in json.loads(line[6:])["choices"]]
                    text = "".join(parts)
                else:
                    text = (await r.json())["choices"][0]["message"]["content"]
        except asyncio.TimeoutError:
            tally.fail("hung")
            return
        except (aiohttp.ClientError, ConnectionError, ValueError, KeyError) as exc:
            tally.fail(f"error:{type(exc).__name__}")
            return
        if text != want:
            tally.fail("wrong-answer")
            return
        tally.ok += 1
        tally.latencies.append(time.monotonic() - t0)
        msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"round {k + 2}: " + "more " * 30}]


async def calibrate(http: aiohttp.ClientSession, url: str, seed: int, seconds: float) -> float:
    """Rounds per second this box sustains, closed loop at concurrency 32."""
    tally, rng, n = Tally(), random.Random(seed), iter(range(10**9))
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            await conversation(http, url, f"cal-{next(n)}", rng, tally)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(32)))
    if tally.failed:
        raise RuntimeError(f"calibration rounds failed: {tally.failed}")
    return tally.ok / (time.monotonic() - t0)


@dataclass
class Sample:
    t_s: float
    rss_kib: int | None
    state: dict | None
    rounds_ok: int
    p50_ms: float | None
    p99_ms: float | None


async def run(args, logdir: Path) -> dict:
    fakes = [FakeEngine("P0", token_delay=0.001), FakeEngine("D0", token_delay=0.001),
             FakeEngine("D1", token_delay=0.001)]
    proc = None
    ttl = args.session_ttl
    try:
        for f in fakes:
            await f.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = logdir / "router.yaml"
        cfg.write_text(f"session_ttl_s: {ttl}\nhealth_interval_s: 2.0\n")
        proc = spawn(["--policy", "ampd", "--prefill", fakes[0].url, "--decode", fakes[1].url, fakes[2].url,
                      "--kv-connector", "ampd", "--host", "127.0.0.1", "--port", str(port), "--config", str(cfg)],
                     logdir / "router.log")
        await wait_ready(proc, url)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as http:
            capacity = await calibrate(http, url, args.seed, min(CALIBRATE_S, max(2.0, args.soak * 6)))
            rate = args.rate or 0.8 * capacity
            print(f"calibration: {capacity:.0f} rounds/s closed-loop at c=32; soak at {rate:.0f} rounds/s "
                  f"for {args.soak:g} min", flush=True)
            rng, tally, samples = random.Random(args.seed), Tally(), []
            open_convs: set[asyncio.Task] = set()
            t0 = time.monotonic()
            end, next_sample, i = t0 + args.soak * 60, t0, 0
            while time.monotonic() < end:
                now = time.monotonic()
                if now >= next_sample:
                    lat = sorted(tally.latencies)
                    tally.latencies = []
                    samples.append(Sample(round(now - t0, 1), rss_kib(proc.pid), await state_sizes(http, url), tally.ok,
                                          round(1e3 * statistics.median(lat), 2) if lat else None,
                                          round(1e3 * lat[int(0.99 * (len(lat) - 1))], 2) if lat else None))
                    print(f"  t={samples[-1].t_s:>7.1f} s  RSS {samples[-1].rss_kib} KiB  rounds ok {tally.ok}  "
                          f"failed {sum(tally.failed.values())}  open {len(open_convs)}  "
                          f"p50 {samples[-1].p50_ms} ms  state {samples[-1].state}", flush=True)
                    for f in fakes:
                        f.requests.clear()  # the fakes' request log is for unit tests; it would grow here
                    next_sample += SAMPLE_S
                await asyncio.sleep(rng.expovariate(rate / ROUNDS))
                if len(open_convs) >= MAX_OPEN:
                    tally.shed += 1
                    continue
                task = asyncio.create_task(conversation(http, url, f"soak-{args.seed}-{i}", rng, tally))
                open_convs.add(task)
                task.add_done_callback(open_convs.discard)
                i += 1
            await asyncio.gather(*open_convs)
            wall = time.monotonic() - t0
            rss_end = rss_kib(proc.pid)
            await asyncio.sleep(ttl + 2 * 2.0 + 1)  # idle: sessions expire at the next health tick after their TTL
            state_idle = await state_sizes(http, url)
            rss_idle = rss_kib(proc.pid)
            alive = proc.poll() is None
    finally:
        stop(proc)
        for f in fakes:
            await f.stop()
    warm = next((s for s in samples if s.t_s >= max(ttl, 0.2 * args.soak * 60)), samples[-1])
    growth = (rss_end - warm.rss_kib) / warm.rss_kib if rss_end and warm.rss_kib else None
    return {"minutes": args.soak, "seed": args.seed, "capacity_rounds_per_s": round(capacity, 1),
            "rate_rounds_per_s": round(rate, 1), "session_ttl_s": ttl, "wall_s": round(wall, 1),
            "conversations": i, "rounds_ok": tally.ok, "failed": tally.failed, "shed": tally.shed,
            "rss_kib_warm": warm.rss_kib, "warm_at_s": warm.t_s, "rss_kib_end": rss_end, "rss_kib_idle": rss_idle,
            "rss_growth": round(growth, 4) if growth is not None else None,
            "state_idle": state_idle, "router_alive": alive, "samples": [asdict(s) for s in samples],
            "router_log": str(logdir / "router.log")}


def report(r: dict) -> str:
    g = f"{100 * r['rss_growth']:+.1f} %" if r["rss_growth"] is not None else "?"
    return "\n".join([
        f"soak {r['minutes']:g} min at {r['rate_rounds_per_s']} rounds/s ({r['capacity_rounds_per_s']} rounds/s "
        f"calibrated closed-loop) · session TTL {r['session_ttl_s']} s · seed {r['seed']}",
        f"conversations {r['conversations']}  rounds ok {r['rounds_ok']}  failed {r['failed'] or 0}  shed {r['shed']}",
        f"router RSS: {r['rss_kib_warm']} KiB after warm-up (t={r['warm_at_s']} s) → {r['rss_kib_end']} KiB at the end "
        f"({g}; goal < +5 %) → {r['rss_kib_idle']} KiB idle",
        f"state after one TTL idle: {r['state_idle']}",
        f"router alive: {r['router_alive']} (log {r['router_log']})"])


def failed(r: dict) -> bool:
    idle = r["state_idle"] or {}
    return bool(r["failed"] or not r["router_alive"] or r["rss_growth"] is None or r["rss_growth"] >= 0.05
                or any(idle.get(k, 1) != 0 for k in ("ampd_router_sessions", "ampd_router_bindings",
                                                     "ampd_router_rounds_in_flight", "ampd_router_stored_prompt_chars")))


def main(args) -> int:
    import tempfile

    logdir = Path(tempfile.mkdtemp(prefix="faults-soak-"))
    r = asyncio.run(run(args, logdir))
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 1 if failed(r) else 0
