"""Router replicas sharing state in a real Redis server (`--state redis://…`), in front of fake engines.

Rounds of one session alternate between replicas and see exactly what one router would have seen (same
decode worker, same history length); each replica's view of a worker includes the other's traffic; a
replica killed mid-session loses nothing; Redis stopped mid-run costs no request and resynchronises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from router_fakes import MODEL, RouterHarness, answer_tokens, prompt_key, run

from ampd_plugin.local_redis import RedisServer
from ampd_plugin.localcluster import free_port
from ampd_plugin.router.redis_store import check_url, redacted_url

REPO = Path(__file__).resolve().parents[2]


def _decisions(caplog, session: str) -> list[dict]:
    logs = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ampd.router.decisions"]
    return [d for d in logs if d.get("session") == session]


def _want(messages: list[dict], n: int) -> str:
    return "".join(answer_tokens(prompt_key({"messages": messages}), n))


async def _conversation(routers: list[RouterHarness], session: str, rounds: int, stream_first: bool = True) -> list:
    """`rounds` rounds of one session, round i through routers[i % len]; asserts each exact answer."""
    msgs = [{"role": "user", "content": "tell me about replicas " * 20}]
    for i in range(rounds):
        h = routers[i % len(routers)]
        stream = stream_first ^ bool(i % 2)
        status, got, _ = await h.chat(msgs, session=session, stream=stream, max_tokens=6)
        assert status == 200, got
        text = got if stream else got["choices"][0]["message"]["content"]
        assert text == _want(msgs, 6)
        msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"and round {i} " * 30}]
    return msgs


async def _wait(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


def _shape(decisions: list[dict]) -> list[tuple]:
    return [(d["round"], d["decode"], d["l_hist"], d["l_incr"]) for d in decisions]


@pytest.fixture
def redis_srv():
    with RedisServer() as srv:
        yield srv


def test_state_url_checks_and_redaction():
    check_url("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="AMPD_REDIS_PASSWORD"):
        check_url("redis://:secret@127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="expected redis://"):
        check_url("http://127.0.0.1:6379")
    assert "secret" not in redacted_url("redis://u:secret@h:1/0")


def test_rounds_alternate_between_replicas_as_if_one_router(redis_srv, caplog):
    """Six rounds, A B A B A B: one decode worker throughout and the same (round, decode, l_hist, l_incr)
    as one router; two routers without shared state (the negative control) lose the history."""
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(n_decode=2, policy="ampd") as single:
            await _conversation([single], "one", 6)
        async with RouterHarness(n_decode=2, state=redis_srv.url, replica_id="A") as a, \
                RouterHarness(n_decode=2, engines_of=a, state=redis_srv.url, replica_id="B") as b:
            await _wait(lambda: a.router.store.replicas() == 2 and b.router.store.replicas() == 2)
            replicas = (a.router.store.replicas(), b.router.store.replicas())
            await _conversation([a, b], "shared", 6)
            # B saw A's samples and KV: its window of the worker A's rounds used is not empty.
            health = await (await b.client.get(b.url + "/health")).json()
        async with RouterHarness(n_decode=2) as c, RouterHarness(n_decode=2, engines_of=c) as d:
            await _conversation([c, d], "unshared", 6)
        return replicas, health

    replicas, health = run(main())
    assert replicas == (2, 2)
    assert health["state"]["backend"] == "redis" and health["state"]["connected"] is True
    one, shared, unshared = (_decisions(caplog, s) for s in ("one", "shared", "unshared"))
    assert len(one) == len(shared) == 6
    assert len({d["decode"] for d in shared}) == 1 and all(d["l_hist"] > 0 for d in shared[1:])
    assert _shape(shared) == _shape(one)
    assert _shape(unshared) != _shape(one)  # without shared state a replica starts the session over
    assert [d["round"] for d in unshared] == [0, 0, 1, 1, 2, 2]


def test_each_replica_sees_the_others_load(redis_srv):
    """Latency samples and KV residency of rounds served only by A reach B's view of the workers."""
    async def main():
        async with RouterHarness(n_decode=2, state=redis_srv.url, replica_id="A") as a, \
                RouterHarness(n_decode=2, engines_of=a, state=redis_srv.url, replica_id="B") as b:
            for i in range(4):
                await _conversation([a], f"s{i}", 2)
            kv_a = {w: a.router.ledger.tokens_on(w) for w in a.router.cluster.decode}
            seen = await _wait(lambda: {w: b.router.ledger.tokens_on(w) for w in b.router.cluster.decode} == kv_a)
            ttft_b = {w: len(s.ttft) for w, s in {**b.router.cluster.prefill, **b.router.cluster.decode}.items()}
            itl_b = {w: len(s.itl) for w, s in b.router.cluster.decode.items()}
            bindings = (dict(a.router.cluster.bindings), dict(b.router.cluster.bindings))
            # A session's end on A (a lapse is local, an eviction is shared): B follows
            return kv_a, seen, ttft_b, itl_b, bindings

    kv_a, seen, ttft_b, itl_b, (bind_a, bind_b) = run(main())
    assert sum(kv_a.values()) > 0 and seen
    assert sum(ttft_b.values()) >= 8 and sum(itl_b.values()) >= 8  # 4 sessions x 2 rounds, all served by A
    assert bind_b == bind_a and len(bind_a) == 4


def test_a_replica_killed_mid_round_loses_no_session(redis_srv, tmp_path):
    """Replica A (a real `ampd-plugin route` process) dies mid-stream in round 2; the client retries on B,
    which waits out A's lock (2 s TTL) and continues with round 1's history."""
    cfg = tmp_path / "router.yaml"
    cfg.write_text("state_lock_ttl_s: 2\nhealth_interval_s: 0.2\n")

    async def main():
        async with RouterHarness(n_decode=1, state=redis_srv.url, replica_id="B", state_lock_ttl_s=2) as b:
            port = free_port()
            cmd = [sys.executable, "-m", "ampd_plugin.cli", "route", "--prefill", b.prefill[0].url, "--decode",
                   b.decode[0].url, "--host", "127.0.0.1", "--port", str(port), "--state", redis_srv.url,
                   "--replica-id", "A", "--config", str(cfg), "--log-level", "warning"]
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            a_url = f"http://127.0.0.1:{port}"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                    for _ in range(200):
                        try:
                            async with http.get(a_url + "/health") as r:
                                if r.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)
                    msgs = [{"role": "user", "content": "first round " * 40}]
                    body = {"model": MODEL, "messages": msgs, "max_tokens": 6}
                    async with http.post(a_url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "k"}) as r:
                        first = (await r.json())["choices"][0]["message"]["content"]
                    msgs2 = msgs + [{"role": "assistant", "content": first}, {"role": "user", "content": "next " * 30}]
                    b.decode[0].token_delay = 0.3  # round 2 streams slowly: A dies in the middle of it
                    body2 = {"model": MODEL, "messages": msgs2, "max_tokens": 20, "stream": True}
                    got = b""
                    try:
                        async with http.post(a_url + "/v1/chat/completions", json=body2,
                                             headers={"X-Session-ID": "k"}) as r:
                            async for chunk in r.content.iter_any():
                                got += chunk
                                if b"content" in got:
                                    proc.send_signal(signal.SIGKILL)
                    except aiohttp.ClientError:
                        pass
                    proc.wait(10)
                    b.decode[0].token_delay = 0.0
                t0 = time.monotonic()
                status, text, _ = await b.chat(msgs2, session="k", max_tokens=6)
                waited = time.monotonic() - t0
                return first, status, text, waited, msgs2
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)

    caplog_records = []
    handler = logging.Handler()
    handler.emit = caplog_records.append
    logging.getLogger("ampd.router.decisions").addHandler(handler)
    logging.getLogger("ampd.router.decisions").setLevel(logging.INFO)
    try:
        first, status, text, waited, msgs2 = run(main(), timeout=90)
    finally:
        logging.getLogger("ampd.router.decisions").removeHandler(handler)
    assert first == _want(msgs2[:1], 6)
    assert status == 200 and text["choices"][0]["message"]["content"] == _want(msgs2, 6)
    assert waited < 10  # at most A's lock TTL plus a round
    b_rounds = [json.loads(r.getMessage()) for r in caplog_records]
    b_rounds = [d for d in b_rounds if d.get("session") == "k" and d.get("ok")]
    assert b_rounds and b_rounds[-1]["round"] >= 1 and b_rounds[-1]["l_hist"] > 0  # round 1's history, found via Redis


def test_redis_down_mid_run_then_back_resynchronises(redis_srv, caplog):
    """Redis stops: both replicas keep serving (200), /health says so; it restarts empty: the records
    written meanwhile are resent, and the session continues on the other replica with its history."""
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(n_decode=2, state=redis_srv.url, replica_id="A") as a, \
                RouterHarness(n_decode=2, engines_of=a, state=redis_srv.url, replica_id="B") as b:
            msgs = await _conversation([a, b], "r", 2)
            redis_srv.stop()
            statuses = []
            for _ in range(3):  # A serves the session alone while Redis is down
                status, got, _ = await a.chat(msgs, session="r", max_tokens=6)
                statuses.append(status)
                msgs = msgs + [{"role": "assistant", "content": got["choices"][0]["message"]["content"]},
                               {"role": "user", "content": "more " * 30}]
            status_b, _, _ = await b.chat([{"role": "user", "content": "hi"}], session="other", max_tokens=4)
            statuses.append(status_b)
            down = await (await a.client.get(a.url + "/health")).json()
            metrics_down = await a.metrics_text()
            redis_srv.start()
            back = await _wait(lambda: a.router.store.status()["connected"] and b.router.store.status()["connected"]
                               and a.router.store.status()["pending_writes"] == 0, 15)
            status, got, _ = await b.chat(msgs, session="r", max_tokens=6)
            return statuses, down, metrics_down, back, status, got, msgs

    statuses, down, metrics_down, back, status, got, msgs = run(main(), timeout=90)
    assert statuses == [200] * 4
    assert down["status"] == "ok" and down["state"]["connected"] is False
    assert "ampd_router_state_connected 0.0" in metrics_down
    assert back and status == 200 and got["choices"][0]["message"]["content"] == _want(msgs, 6)
    rounds = _decisions(caplog, "r")
    # A served rounds 2..4 from its local copy (B's round 1 may not have reached Redis before it stopped);
    # B continued from the record A resent, the newest: its round count and history.
    assert rounds[-1]["round"] == rounds[-2]["round"] + 1 and rounds[-1]["l_hist"] >= rounds[-2]["l_hist"] > 0
