"""The Locust glue end to end against an in-process fake OpenAI streaming server (no engine).

Covers what the pure-logic tests cannot: custom arguments reach the users, sessions start and finish,
the test stops itself when every session was played, the report files appear, the exit code follows
`--slo-target`, and in distributed mode (master + 2 workers) the workers' raw records reach the master
and are merged into one report. The real-engine run is tests/integration/test_loadtest_real.py.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ampd_plugin.localcluster import free_port
from aiohttp import web

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
TOKEN_DELAY_S = 0.005


class FakeOpenAI:
    """Streams `max_tokens` one-word chunks after a role-only chunk, then usage and [DONE]."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "root": ""}]})

    async def chat(self, request):
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        n = int(body.get("max_tokens", 4))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-ampd-route": "local"})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(n):
            await asyncio.sleep(TOKEN_DELAY_S)
            await send({"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]})
        await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        await send({"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": n}})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def fake_server():
    server = FakeOpenAI().start()
    yield server
    server.stop()


def _locust_args(host, out_dir, *extra):
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--workload", "hotpotqa", "--sessions", "6", "--session-rate", "4", "--seed", "3",
        "--input-scale", "0.02", "--output-scale", "0.1", "--tokenizer", "",
        "--ttft-slo", "1.0", "--itl-slo", "0.5", "--report-dir", str(out_dir),
        "--run-time", "60s", "--stop-timeout", "5", "--only-summary", *extra,
    ]


def _check_report(out_dir: Path, sessions: int = 6, rounds: int = 18) -> dict:
    report = json.loads((out_dir / "report.json").read_text())
    with open(out_dir / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert (out_dir / "report.png").stat().st_size > 0
    assert len(rows) == rounds == report["summary"]["rounds"]
    assert len({r["session_id"] for r in rows}) == sessions == report["sessions"]
    assert report["summary"]["errors"] == 0
    assert {r["route"] for r in rows} == {"local"}
    # lengths held: every round produced exactly its requested tokens (>= 1)
    assert all(int(r["output_tokens"]) >= 1 and int(r["chunks"]) == int(r["output_tokens"]) for r in rows)
    return report


def test_local_run_writes_report_and_passes(fake_server, tmp_path):
    proc = subprocess.run(_locust_args(fake_server.url, tmp_path, "-u", "6", "-r", "6"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _check_report(tmp_path)
    assert report["summary"]["slo_attainment"] == 1.0 and report["passed"]
    assert report["meta"]["rounds_planned"] == 18
    # the session header and the streaming options were sent on every request
    bodies = fake_server.requests[-18:]
    assert all(r["headers"].get("X-Session-ID", "").startswith("hotpotqa-") for r in bodies)
    assert all(r["body"]["stream"] and r["body"]["ignore_eos"] for r in bodies)
    # round k of a session carries 2k+1 messages (user, assistant, user, ...)
    assert sorted({len(r["body"]["messages"]) for r in bodies}) == [1, 3, 5]


def test_exit_code_nonzero_below_target(fake_server, tmp_path):
    args = _locust_args(fake_server.url, tmp_path, "-u", "6", "-r", "6")
    args[args.index("--ttft-slo") + 1] = "0.0001"  # impossible TTFT SLO
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["slo_attainment"] == 0.0 and not report["passed"]


def test_distributed_run_merges_worker_records(fake_server, tmp_path):
    port = free_port()
    master = subprocess.Popen(
        _locust_args(fake_server.url, tmp_path, "-u", "6", "-r", "6", "--master", "--expect-workers", "2",
                     "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                     # generous: it quits as soon as every session is done; on a busy host the workers' start-up
                     # alone can take tens of seconds
                     "--run-time", "150s"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [
        subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                          "--master-host", "127.0.0.1", "--master-port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        _, err = master.communicate(timeout=240)
        assert master.returncode == 0, err[-3000:]
        report = _check_report(tmp_path)
        assert report["meta"]["workers"] == 2
        with open(tmp_path / "records.csv") as f:
            assert {r["source"] for r in csv.DictReader(f)} == {"worker0", "worker1"}
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
