"""The router's KV ledger follows what the connector does: rounds in flight count, residency lasts the
connector's retention TTL (as the engine reports it), a recompute the connector reports is an eviction,
and a migrated session's pin on the worker it left is released."""

import asyncio
import json
import logging

import pytest
from router_fakes import MODEL, RouterHarness, run

from ampd_plugin.router.engine_metrics import parse
from ampd_plugin.router.ledger import CONNECTOR_DEFAULT_RETENTION_S, KVLedger
from ampd_plugin.router.sessions import Session, SessionStore
from ampd_plugin.router_policy.state import ClusterState, WorkerState

USER = [{"role": "user", "content": "hello there, tell me a story " * 4}]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ledger(ttl=None):
    cluster = ClusterState()
    for wid in ("d0", "d1"):
        cluster.add_worker(WorkerState(wid, "decode"))
    clock = Clock()
    return KVLedger(cluster, SessionStore(1800), residency_ttl_s=ttl, clock=clock), cluster, clock


def test_a_round_counts_from_dispatch_and_stays_resident_for_the_connectors_ttl():
    led, c, clock = ledger()
    s = Session("s", True)
    led.begin(s, "d0", 100)
    assert (c.decode["d0"].kv_used_tokens, led.in_flight(), led.history(s, "d0")) == (100, 1, 0)
    led.settle(s, "d0", 120)
    assert (c.decode["d0"].kv_used_tokens, led.in_flight(), led.history(s, "d0"), led.history(s, "d1")) == (120, 0, 120, 0)
    clock.t += CONNECTOR_DEFAULT_RETENTION_S - 1
    assert led.history(s, "d0") == 120
    clock.t += 2  # the connector's pin lapsed: not assumed cached, not counted
    assert (led.history(s, "d0"), c.decode["d0"].kv_used_tokens, s.resident_worker, led.expired) == (0, 0, None, 1)


def test_the_ttl_reported_by_an_engine_applies_to_that_worker_and_the_operators_figure_wins():
    led, c, clock = ledger()
    a, b = Session("a", True), Session("b", True)
    led.learn_retention("d1", 30.0)
    led.learn_retention("d1", float("nan"))  # nonsense is ignored
    led.settle(a, "d0", 10)
    led.settle(b, "d1", 20)
    clock.t += 31
    assert led.expire() == ["b"]
    assert (c.decode["d0"].kv_used_tokens, c.decode["d1"].kv_used_tokens, b.resident_tokens) == (10, 0, 0)
    fixed, _, clock2 = ledger(ttl=5.0)
    fixed.learn_retention("d0", 300.0)
    s = Session("s", True)
    fixed.settle(s, "d0", 10)
    clock2.t += 6
    assert fixed.history(s, "d0") == 0


def test_an_eviction_drops_the_residency_but_not_a_round_in_flight():
    led, c, _ = ledger()
    s = Session("s", True)
    led.settle(s, "d0", 50)
    assert led.evict(s, "d1") is False and led.history(s, "d0") == 50  # not held there
    assert led.evict(s, "d0") is True
    assert (led.history(s, "d0"), c.decode["d0"].kv_used_tokens) == (0, 0)
    led.settle(s, "d0", 50)
    led.begin(s, "d0", 80)  # the next round runs; the connector then reports the history was recomputed
    led.evict(s, "d0")
    assert (s.resident_worker, c.decode["d0"].kv_used_tokens, led.in_flight()) == (None, 80, 1)
    led.settle(s, None, 0)
    assert (len(led), c.decode["d0"].kv_used_tokens) == (0, 0)


def test_engine_metrics_give_the_connectors_retention_ttl():
    page = ('# TYPE vllm:ampd_retention_ttl_seconds gauge\n'
            'vllm:ampd_retention_ttl_seconds{engine="0",model_name="m"} 120.0\n'
            'vllm:ampd_retention_ttl_seconds{engine="1",model_name="m"} 90.0\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n')
    s = parse(page)
    assert s.retention_ttl_s == 90.0 and s.running == 1  # the shortest pin, never the sum
    assert parse('vllm:num_requests_running{engine="0"} 0\n').retention_ttl_s is None


def rounds_logged(caplog):
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "ampd.router.decisions"]


@pytest.mark.parametrize("reported", [0.4, None])
def test_residency_lapses_with_the_ttl_the_decode_engine_reports(reported, caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="colocated") as h:
            if reported is not None:
                h.decode[0].metrics_page = f'vllm:ampd_retention_ttl_seconds{{engine="0"}} {reported}\n'
            await asyncio.sleep(0.5)  # a health round polls /metrics
            _, out, _ = await h.chat(USER, session="s")
            d = h.router.cluster.decode["decode-0"]
            after_round = d.kv_used_tokens
            await asyncio.sleep(1.0)  # > the reported TTL: health ticks drop the residency
            lapsed = d.kv_used_tokens
            msgs = USER + [out["choices"][0]["message"], {"role": "user", "content": "and then?"}]
            await h.chat(msgs, session="s")
            return after_round, lapsed, h.router.ledger.retention_s("decode-0")

    after_round, lapsed, ttl = run(main())
    second = rounds_logged(caplog)[-1]
    assert after_round > 0
    if reported is not None:
        assert ttl == reported and lapsed == 0 and second["l_hist"] == 0
    else:  # the connector's default (300 s): still resident, the next round reuses its history
        assert ttl == CONNECTOR_DEFAULT_RETENTION_S and lapsed == after_round and second["l_hist"] > 0


def test_a_round_in_flight_counts_toward_the_decode_workers_kv():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            h.decode[0].token_delay = 0.1
            d = h.router.cluster.decode["decode-0"]
            body = {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True}
            async with h.client.post(h.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "s"}) as r:
                async for line in r.content:
                    if b'"content":" w' in line:
                        break
                during = d.kv_used_tokens, await h.metrics_text()
                await r.read()
            return during, d.kv_used_tokens, h.router.sessions.get("s", True)

    (kv_during, metrics), kv_after, s = run(main())
    assert kv_during > 0 and "ampd_router_rounds_in_flight 1.0" in metrics
    assert kv_after == s.resident_tokens > kv_during  # the prompt while in flight, prompt + output after


def test_a_history_the_holder_recomputed_is_an_eviction_the_router_learns(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="disagg") as h:
            seen = []
            real = h.router.policy.on_metrics
            h.router.policy.on_metrics = lambda w, kind, v, now: (seen.append((w, kind, v)), real(w, kind, v, now))
            h.router.accounting.policy = h.router.policy
            _, out, _ = await h.chat(USER, session="s")
            s = h.router.sessions.get("s", True)
            first = (s.resident_worker, s.resident_tokens)
            h.prefill[0].prefill_stats = {"history_recomputed_tokens": 40}  # D had evicted the history
            h.decode[0].token_delay = 0.1
            msgs = USER + [out["choices"][0]["message"], {"role": "user", "content": "and then?"}]
            body = {"model": MODEL, "messages": msgs, "max_tokens": 8, "stream": True}
            async with h.client.post(h.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "s"}) as r:
                async for line in r.content:
                    if b'"content":" w' in line:
                        break
                during = (s.resident_worker, s.resident_tokens, h.router.ledger.in_flight())
                await r.read()
            return first, during, (s.resident_worker, s.resident_tokens), await h.metrics_text(), seen

    first, during, after, metrics, seen = run(main())
    assert first[0] == "decode-0" and first[1] > 0
    assert during == (None, 0, 1)  # mid-round: no history is assumed on decode-0 any more
    assert 'ampd_router_history_recomputed_tokens_total{worker="decode-0"} 40.0' in metrics
    assert 'ampd_router_residency_dropped_total{reason="evicted"} 1.0' in metrics
    assert ("decode-0", "history_recomputed_tokens", 40.0) in seen
    log = rounds_logged(caplog)[-1]
    assert log["history_recomputed"] == 40 and log["l_hist"] > 0
    # the round itself recomputed and retained the history on decode-0: it is resident again afterwards
    assert after[0] == "decode-0" and after[1] > first[1]


def test_a_migration_releases_the_pin_on_the_worker_the_session_left():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", decode_kv_tokens=400) as h:
            msgs = [{"role": "user", "content": "x " * 300}]
            _, out, h1 = await h.chat(msgs, session="m", max_tokens=8)
            old = int(h1["x-ampd-decode"][-1])
            h.router.cluster.decode[h1["x-ampd-decode"]].kv_used_tokens = 390
            msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "go on"}]
            n_before = len(h.decode[old].requests)
            status, _, h2 = await h.chat(msgs, session="m", max_tokens=8)
            for _ in range(50):
                if len(h.decode[old].requests) > n_before:
                    break
                await asyncio.sleep(0.02)
            return status, old, h2["x-ampd-decode"], h.decode[old].requests[n_before:], await h.metrics_text()

    status, old, new, old_requests, metrics = run(main())
    assert status == 200 and new != f"decode-{old}"
    (release,) = old_requests
    assert release["kv_transfer_params"] == {"ampd": {"v": 1, "role": "local", "session": "m", "retain": False}}
    assert release["max_tokens"] == 1 and release["prompt"] == [0]
    assert 'ampd_router_retention_releases_total{outcome="sent"} 1.0' in metrics
