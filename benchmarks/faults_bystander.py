"""The fake engines of the hostile-input run, in a process of their own, with one bystander stream: how long
does other traffic hold up a stream that has nothing to do with it?

    (started by benchmarks/faults.py; speaks JSON lines on stdin/stdout)

Why a process of its own: the hostile clients keep faults.py's event loop busy, so an engine or a stream
reader on that loop would time the client's own lag, not the router's. Here the decode engine paces its
tokens every TOKEN_DELAY_S and the bystander reads them on a loop with little else to do: a gap between
two tokens longer than the pacing is time the stream spent waiting in the router (or for a core).

The bystander streams one long answer after another (anonymous, so no session is left behind) and checks
each complete answer against the fake model's.

Protocol: prints {"prefill": URL, "decode": URL} when the engines listen; then, one JSON object per line:
  {"start": LABEL, "router": URL}   start streaming through the router
  {"stop": true}                    stop; prints {"label": LABEL, "gaps": summary, "answers": {...}}
  {"quit": true}                    stop the engines and exit
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "unit")]

from router_fakes import MODEL, FakeEngine, answer_tokens, prompt_key  # noqa: E402

TOKEN_DELAY_S = 0.005
ANSWER_TOKENS = 200  # a second a stream at the pacing above
STALL_MS = 10.0  # the goal: no stream held up longer than this by other traffic


def summary(excess_ms: list[float]) -> dict:
    """Percentiles of the time each token arrived later than the engine's pacing, in ms."""
    if not excess_ms:
        return {"n": 0}
    xs = sorted(excess_ms)

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 2)

    return {"n": len(xs), "p50": q(0.50), "p99": q(0.99), "p999": q(0.999), "max": round(xs[-1], 2),
            f"over_{STALL_MS:g}ms": sum(x > STALL_MS for x in xs)}


async def bystander(router: str, excess_ms: list[float], answers: dict) -> None:
    """Long streamed answers one after another; the lateness of every token after the first."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        n = 0
        while True:
            n += 1
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"bystander {n}"}],
                    "max_tokens": ANSWER_TOKENS, "stream": True}
            got, last = [], None
            try:
                async with http.post(router + "/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        answers[f"status {r.status}"] = answers.get(f"status {r.status}", 0) + 1
                        await asyncio.sleep(0.1)
                        continue
                    async for line in r.content:
                        if not line.startswith(b"data: {"):
                            continue
                        now = time.monotonic()
                        deltas = [c.get("delta", {}).get("content") or "" for c in json.loads(line[6:])["choices"]]
                        if not any(deltas):
                            continue
                        if last is not None:  # several tokens in one read each count as one interval late
                            excess_ms.append(max(0.0, (now - last - TOKEN_DELAY_S * len(deltas)) * 1000))
                        last = now
                        got += deltas
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                answers[f"error {type(exc).__name__}"] = answers.get(f"error {type(exc).__name__}", 0) + 1
                continue
            ok = "".join(got) == "".join(answer_tokens(prompt_key(body), ANSWER_TOKENS))
            answers["exact" if ok else "wrong"] = answers.get("exact" if ok else "wrong", 0) + 1


async def serve() -> None:
    fakes = [FakeEngine("P0"), FakeEngine("D0", token_delay=TOKEN_DELAY_S)]
    for f in fakes:
        await f.start()
    print(json.dumps({"prefill": fakes[0].url, "decode": fakes[1].url}), flush=True)
    loop = asyncio.get_running_loop()
    task, label, excess, answers = None, None, [], {}
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if "start" in cmd:
                label, excess, answers = cmd["start"], [], {}
                task = asyncio.create_task(bystander(cmd["router"], excess, answers))
            elif "stop" in cmd:
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    task = None
                for f in fakes:
                    f.requests.clear()  # a long run must not grow the fakes' request log
                print(json.dumps({"label": label, "gaps": summary(excess), "answers": answers}), flush=True)
            elif "quit" in cmd:
                break
    finally:
        if task is not None:
            task.cancel()
        for f in fakes:
            await f.stop()


if __name__ == "__main__":
    asyncio.run(serve())
