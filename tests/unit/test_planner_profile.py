"""`ampd-plugin profile` against a fake OpenAI engine whose timing follows known coefficients."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web
from click.testing import CliRunner

from ampd_plugin.costmodel import FittedCostModel, Layout
from ampd_plugin.localcluster import free_port
from ampd_plugin.planner.profile import profile, steady_step_time
from ampd_plugin.planner.serving import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET, ServingTerms

PRE = (0.03, 4e-5, 0.0)  # a, b, c of T_pre
DEC = (0.01, 0.004)  # step = a + b·(streams decoding)


class FakeEngine:
    """Prefix cache at 16-token blocks, prefill time from PRE, decode steps slowed by concurrent streams."""

    def __init__(self):
        self.cached: set[tuple[int, ...]] = set()
        self.decoding = 0

    def hit(self, ids):
        best = 0
        for n in range(16, len(ids) + 1, 16):
            if tuple(ids[:n]) in self.cached:
                best = n
        return best

    def remember(self, ids):
        for n in range(16, len(ids) + 1, 16):
            self.cached.add(tuple(ids[:n]))

    async def models(self, _req):
        return web.json_response({"data": [{"id": "fake", "root": "/nonexistent"}]})

    async def metrics(self, _req):
        return web.Response(text='vllm:cache_config_info{block_size="16",num_gpu_blocks="500"} 1.0\n')

    async def completions(self, req):
        body = await req.json()
        ids = body["prompt"]
        hist = self.hit(ids)
        incr = len(ids) - hist
        a, b, c = PRE
        await asyncio.sleep(a + b * incr + c * incr * (hist + incr / 2))
        self.remember(ids)
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        chunk = b"data: " + json.dumps({"choices": [{"text": "x"}]}).encode() + b"\n\n"
        await resp.write(chunk)
        self.decoding += 1
        try:
            for _ in range(body["max_tokens"] - 1):
                await asyncio.sleep(DEC[0] + DEC[1] * self.decoding)
                await resp.write(chunk)
        finally:
            self.decoding -= 1
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    loop = asyncio.new_event_loop()
    engine = FakeEngine()
    app = web.Application()
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/health", lambda _req: web.Response(text="ok"))
    app.router.add_get("/metrics", engine.metrics)
    app.router.add_post("/v1/completions", engine.completions)
    runner = web.AppRunner(app)
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_profile_fits_known_coefficients(tmp_path, fake_url):
    out = tmp_path / "fit.yaml"
    res = CliRunner().invoke(profile, [
        "--endpoint", fake_url, "--out", str(out), "--kv-bytes-per-token", "512",
        "--hist", "0,64,256", "--incr", "32,512,1024", "--batches", "1,2,4", "--contexts", "32,64",
        "--decode-tokens", "8", "--repeats", "3", "--device", "fake"])  # medians: host noise only adds time
    assert res.exit_code == 0, res.output
    fitted = FittedCostModel.from_yaml(out)
    lay = Layout(1)
    # Prefill: the history is cached, so only the increment costs (the fit recovers a + b·l_incr).
    assert fitted.t_pre(256, 1024, lay) == pytest.approx(PRE[0] + PRE[1] * 1024, rel=0.3)
    assert fitted.t_pre(0, 32, lay) == pytest.approx(PRE[0] + PRE[1] * 32, rel=0.3)
    # Decode: the step grows with the batch.
    assert fitted.t_dec(4, 4 * 50, lay) > fitted.t_dec(1, 50, lay)
    assert fitted.t_dec(4, 200, lay) == pytest.approx(DEC[0] + DEC[1] * 4, rel=0.35)
    assert fitted.kv_capacity_tokens(lay) == 500 * 16
    assert fitted.meta["fit"]["prefill_mape"] < 0.3
    assert fitted.meta["link_source"].startswith("assumed")
    # Serving path: measured through a real `ampd-plugin route` started by the profile (one endpoint, so no
    # remote round); the fake engine adds nothing per request, so the router's own hop is what remains.
    terms = ServingTerms.for_model(fitted)
    assert terms.token_budget == GPU_TOKEN_BUDGET and terms.frontend_in_t_pre
    assert 0 < terms.router_s < 0.5  # loose: the unit suite shares two cores with other work
    assert terms.frontend_s < 0.05
    assert len(fitted.meta["samples"]["serving"]["router_local"]) == 2 * 3  # two shapes, at least three repeats
    assert any("remote-round costs not measured" in n for n in fitted.meta["serving_notes"])


def test_profile_without_the_router_records_what_it_skipped(tmp_path, fake_url):
    out = tmp_path / "fit.yaml"
    res = CliRunner().invoke(profile, [
        "--endpoint", fake_url, "--out", str(out), "--kv-bytes-per-token", "512", "--hist", "0,64",
        "--incr", "32,512", "--batches", "1,2", "--contexts", "32,64", "--decode-tokens", "4", "--repeats", "1",
        "--device", "cpu", "--no-via-router"])
    assert res.exit_code == 0, res.output
    fitted = FittedCostModel.from_yaml(out)
    terms = ServingTerms.for_model(fitted)
    assert terms.token_budget == CPU_TOKEN_BUDGET and terms.router_s == 0.0
    assert "router_local" not in fitted.meta["samples"]["serving"]


def test_profile_unreachable_endpoint_is_a_clear_error(tmp_path):
    port = free_port()
    res = CliRunner().invoke(profile, ["--endpoint", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "x.yaml"),
                                       "--timeout", "5"])
    assert res.exit_code == 1
    assert "cannot reach" in res.output


def test_steady_step_time_counts_tokens_not_chunks():
    # 6 tokens at 0.1 s, but the second stream's last three arrive as one coalesced chunk.
    s1 = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    s2 = [0.0, 0.1, 0.2, 0.5]
    assert steady_step_time([s1, s2], tokens=6) == pytest.approx(0.1)


def test_steady_step_time_leaves_out_streams_that_arrived_in_one_burst():
    from ampd_plugin.planner.profile import CoalescedStreams

    timed, burst = [0.0, 0.1, 0.2, 0.3], [0.5, 0.5, 0.5, 0.5]
    assert steady_step_time([timed, burst, burst], tokens=4) == pytest.approx(0.1)
    with pytest.raises(CoalescedStreams):
        steady_step_time([burst, burst], tokens=4)


def test_steady_step_time_ignores_a_burst_held_back_at_the_start():
    # 8 tokens at 0.1 s, but the first five reached the client together at 0.4 s: the step is still 0.1 s,
    # not (0.7 - 0.4) / 7.
    held = [0.4, 0.4, 0.4, 0.4, 0.4, 0.5, 0.6, 0.7]
    assert steady_step_time([held], tokens=8) == pytest.approx(0.1)
    # Almost all of a stream in its opening burst shows too little to measure.
    from ampd_plugin.planner.profile import CoalescedStreams

    with pytest.raises(CoalescedStreams):
        steady_step_time([[0.4] * 7 + [0.5]], tokens=8)


class _BurstyEngine:
    """Every stream arrives in one write at its end: TTFT 0.2 s, then 0.05 s per further token."""

    async def stream(self, ids, max_tokens, kv=None, headers=None):
        end = 0.2 + 0.05 * (max_tokens - 1)
        return [end] * max_tokens


def test_decode_step_falls_back_to_end_to_end_times_when_streams_arrive_in_one_burst():
    from ampd_plugin.planner.profile import Grid, Profiler

    prof = Profiler(Grid(decode_tokens=9, repeats=2))
    step = asyncio.run(prof.decode_step(_BurstyEngine(), batch=2, ctx=64, n_out=9))
    assert step == pytest.approx(0.05)


class _FlatEngine:
    async def stream(self, ids, max_tokens, kv=None, headers=None):
        return [0.3] * max_tokens


def test_decode_step_is_none_when_nothing_shows_the_step_time():
    from ampd_plugin.planner.profile import Grid, Profiler

    assert asyncio.run(Profiler(Grid(repeats=2)).decode_step(_FlatEngine(), batch=1, ctx=64, n_out=8)) is None
