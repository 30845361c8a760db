"""Sick workers against the real router: 5xx-answering, hung and dying engines are routed around and ejected."""

import asyncio
import time

from router_fakes import RouterHarness, run

from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.outliers import OutlierDetector

USER = [{"role": "user", "content": "hello there"}]


def test_breaker_ejects_after_consecutive_failures_backs_off_and_probes_back():
    now = [0.0]
    ejected = []
    d = OutlierDetector(["w"], RouterMetrics(), lambda wid, why: ejected.append(wid), failures=3, base_s=10,
                        max_s=25, clock=lambda: now[0])
    d.failure("w", "5xx")
    d.success("w")  # a success resets the count
    d.failure("w", "5xx")
    d.failure("w", "5xx")
    assert not ejected and d.suspect("w")
    now[0] = 5.0
    d.failure("w", "timeout")
    assert ejected == ["w"] and d.ejected("w") and not d.may_return("w")
    now[0] = 15.5
    assert d.may_return("w") and not d.suspect("w")  # probation: takes traffic, one failure ejects
    d.failure("w", "5xx")  # one failure on probation: out again, back-off doubled
    assert ejected == ["w", "w"] and d.ejected("w")
    now[0] = 15.5 + 19.9
    assert not d.may_return("w")
    now[0] = 15.5 + 20.1
    assert d.may_return("w")
    d.success("w")
    assert not d.suspect("w")
    for _ in range(3):
        d.failure("w", "5xx")
    now[0] += 9.9
    assert d.ejected("w")  # back-off reset to the base after the successful probe


def _decode_of(headers):
    return headers.get("x-ampd-decode")


def test_a_decode_worker_answering_500_loses_its_sessions_and_gets_no_new_ones():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", eject_base_s=0.6) as h:
            first = {}
            for i in range(8):
                _, _, hd = await h.chat(USER, session=f"s{i}")
                first[f"s{i}"] = _decode_of(hd)
            h.decode[0].fail_status = 500  # /health stays OK
            later = [await h.chat(USER + [{"role": "user", "content": f"r{i}"}], session=sid) for i, sid in enumerate(first)]
            new = [await h.chat(USER, session=f"new{i}") for i in range(10)]
            metrics = await h.metrics_text()
            h.decode[0].fail_status = None
            await asyncio.sleep(1.2)  # back-off over, health probe lets it back on probation
            back = [await h.chat(USER, session=f"late{i}") for i in range(6)]
            return first, later, new, metrics, back

    first, later, new, metrics, back = run(main())
    assert "decode-0" in first.values()
    assert all(status == 200 for status, _, _ in later + new)
    assert all(_decode_of(hd) == "decode-1" for _, _, hd in later + new)
    assert 'ampd_router_worker_ejections_total{worker="decode-0"} 1.0' in metrics
    assert "decode-0" in {_decode_of(hd) for _, _, hd in back}


def test_a_hung_decode_worker_fails_fast_frees_its_slot_and_is_ejected():
    async def main():
        # Without mid-stream failover (its own tests: test_router_failover.py) the stalled sessions keep
        # their binding until the worker is ejected.
        async with RouterHarness(n_decode=2, policy="colocated", stall_timeout_s=0.4, eject_base_s=30,
                                 failover_limit=0) as h:
            for i in range(4):
                await h.chat(USER, session=f"s{i}")
            h.decode[0].first_token_delay = 60  # streams open, no token ever comes
            t0 = time.monotonic()
            got = await asyncio.gather(*(h.chat(USER + [{"role": "user", "content": "more"}], session=f"s{i}", stream=True)
                                         for i in range(4)))
            first_pass = time.monotonic() - t0
            for i in range(4):  # until the third stall ejects it, a session may still be sent there
                await h.chat(USER + [{"role": "user", "content": "again"}], session=f"s{i}", stream=True)
            again = [await h.chat(USER + [{"role": "user", "content": "third"}], session=f"s{i}", stream=True) for i in range(4)]
            new = [await h.chat(USER, session=f"n{i}", stream=True) for i in range(6)]
            return first_pass, got, again, new, h.router.outliers.ejected("decode-0"), h.router.queues.inflight("decode-0")

    first_pass, got, again, new, ejected, inflight = run(main())
    assert first_pass < 5  # not the 120 s read timeout
    assert ejected and inflight == 0
    assert all(status == 200 and _decode_of(hd) == "decode-1" for status, _, hd in again + new)


def test_a_hung_prefill_worker_is_routed_around():
    async def main():
        async with RouterHarness(n_prefill=1, n_decode=1, policy="disagg", stall_timeout_s=0.4, eject_base_s=30) as h:
            h.prefill[0].first_token_delay = 60
            t0 = time.monotonic()
            out = [await h.chat(USER, session=f"n{i}") for i in range(10)]
            return out, time.monotonic() - t0, h.router.outliers.ejected("prefill-0")

    out, elapsed, ejected = run(main())
    assert all(status == 200 for status, _, _ in out) and elapsed < 10 and ejected


def test_without_failover_a_decode_worker_dying_mid_stream_ends_the_stream_cleanly_and_the_session_moves():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", failover_limit=0) as h:
            await h.chat(USER, session="s")
            victim = h.router.cluster.bindings["s"]
            engine = h.decode[int(victim[-1])]
            engine.token_delay = 0.05

            async def kill_soon():
                await asyncio.sleep(0.15)
                await engine.die()

            killer = asyncio.create_task(kill_soon())
            body = {"messages": USER + [{"role": "user", "content": "go"}], "max_tokens": 40, "stream": True}
            async with h.client.post(h.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "s"}) as r:
                raw = await r.read()
            await killer
            nxt = await h.chat(USER + [{"role": "user", "content": "next"}], session="s")
            return victim, r.status, raw, nxt

    victim, status, raw, nxt = run(main())
    assert status == 200 and b'"code": "stream_broken"' in raw
    assert nxt[0] == 200 and _decode_of(nxt[2]) != victim


def test_a_burst_of_new_sessions_spreads_over_decode_workers():
    async def main():
        async with RouterHarness(n_decode=2, policy="ampd") as h:
            await h.chat(USER + [{"role": "user", "content": "x " * 40}], session="warm")  # decode-? holds a little KV
            got = await asyncio.gather(*(h.chat(USER, session=f"b{i}") for i in range(40)))
            return [_decode_of(hd) for _, _, hd in got]

    where = run(main())
    assert min(where.count("decode-0"), where.count("decode-1")) >= 15


def test_a_worker_streaming_garbage_gives_the_client_an_error_event_and_counts_as_a_failure():
    async def main():
        async with RouterHarness(n_decode=1, policy="colocated") as h:
            h.decode[0].garbage_stream = b"<html>502 Bad Gateway</html>\n"
            body = {"messages": USER, "max_tokens": 8, "stream": True}
            async with h.client.post(h.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "g"}) as r:
                raw = await r.read()
            return r.status, raw, await h.metrics_text()

    status, raw, metrics = run(main())
    assert status == 200 and b'"code": "stream_incomplete"' in raw
    assert 'kind="stream_incomplete"' in metrics and 'worker_failures_total{kind="broken"' in metrics.replace(
        'worker="decode-0",', "")
