"""The router end to end against in-process fake engines: routes, streaming relay, sessions, faults, input."""

import asyncio
import json
import logging

import aiohttp
import pytest
from router_fakes import MODEL, RouterHarness, answer_tokens, prompt_key, run

USER = [{"role": "user", "content": "hello there, tell me a story"}]


def expected(messages, n=8):
    return "".join(answer_tokens(prompt_key({"messages": messages}), n))


def ampd_params(req):
    return (req.get("kv_transfer_params") or {}).get("ampd") or {}


@pytest.mark.parametrize("stream", [False, True])
def test_local_route_relays_the_decode_workers_answer(stream):
    async def main():
        async with RouterHarness(policy="colocated") as h:
            status, out, headers = await h.chat(USER, session="s1", stream=stream)
            return status, out, headers, h.prefill[0].requests, h.decode[0].requests

    status, out, headers, p_reqs, d_reqs = run(main())
    text = out if stream else out["choices"][0]["message"]["content"]
    assert status == 200 and text == expected(USER)
    assert headers["x-ampd-route"] == "local" and p_reqs == []
    assert ampd_params(d_reqs[0]) == {"v": 1, "role": "local", "session": "s1"}
    assert "session_id" not in d_reqs[0]


@pytest.mark.parametrize("stream", [False, True])
def test_remote_route_prefills_on_p_then_decodes_on_d(stream):
    async def main():
        async with RouterHarness(policy="disagg") as h:
            status, out, headers = await h.chat(USER, session="s1", stream=stream)
            return status, out, headers, h.prefill[0].requests, h.decode[0].requests

    status, out, headers, p_reqs, d_reqs = run(main())
    text = out if stream else out["choices"][0]["message"]["content"]
    assert status == 200 and text == expected(USER)
    assert headers["x-ampd-route"] == "remote" and headers["x-ampd-worker"] == "prefill-0"
    (p,), (d,) = p_reqs, d_reqs
    assert p["max_tokens"] == 1 and p["stream"] is False and p["messages"] == USER
    assert ampd_params(p)["role"] == "prefill"
    assert ampd_params(d)["role"] == "decode" and ampd_params(d)["source"]["xfer"] == ampd_params(p)["xfer"]
    assert d["stream"] is stream and d["max_tokens"] == 8


def test_completions_endpoint_and_client_kv_params_are_dropped():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 4,
                    "kv_transfer_params": {"ampd": {"role": "export", "xfer": "evil"}}}
            async with h.client.post(h.url + "/v1/completions", json=body) as r:
                return r.status, await r.json(), h.decode[0].requests

    status, out, reqs = run(main())
    assert status == 200
    assert out["choices"][0]["text"] == "".join(answer_tokens(json.dumps("once upon a time"), 4))
    assert ampd_params(reqs[0])["role"] == "local"  # the client's transfer request never reached the engine


def test_multi_round_session_is_sticky_and_history_is_read_from_its_decode_worker():
    async def main():
        async with RouterHarness(n_decode=2, policy="disagg") as h:
            msgs = list(USER)
            seen = []
            for _ in range(3):
                status, out, headers = await h.chat(msgs, session="conv")
                assert status == 200
                seen.append(headers["x-ampd-decode"])
                msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "and then?"}]
            return seen, h.prefill[0].requests, h.router

    seen, p_reqs, router = run(main())
    assert len(set(seen)) == 1
    hist = [ampd_params(r).get("history") for r in p_reqs]
    assert hist[0] is None
    bound_url = router.eps[seen[0]].url
    assert hist[1]["from"] == bound_url and 0 < hist[1]["tokens"] < hist[2]["tokens"]


def test_sessions_spread_over_decode_workers_and_anonymous_are_forgotten():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated") as h:
            workers = set()
            for i in range(4):
                _, _, headers = await h.chat(USER, session=f"s{i}")
                workers.add(headers["x-ampd-decode"])
            await h.chat(USER)  # anonymous
            return workers, len(h.router.sessions), dict(h.router.cluster.bindings)

    workers, n_sessions, bindings = run(main())
    assert workers == {"decode-0", "decode-1"}
    assert n_sessions == 4 and len(bindings) == 4


def test_threshold_policy_uses_both_routes_and_metrics_show_them(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="threshold", policy_params={"max_local_tokens": 64}) as h:
            msgs = [{"role": "user", "content": "long context " * 100}]  # ~330 estimated tokens: remote
            _, out, h1 = await h.chat(msgs, session="t")
            msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "ok?"}]
            _, _, h2 = await h.chat(msgs, session="t", stream=True)  # short increment: local
            return h1["x-ampd-route"], h2["x-ampd-route"], await h.metrics_text()

    r1, r2, metrics = run(main())
    assert (r1, r2) == ("remote", "local")
    assert 'ampd_router_routes_total{reason="long-increment",route="remote",worker="prefill-0"} 1.0' in metrics
    assert 'ampd_router_routes_total{reason="short-increment",route="local",worker="decode-0"} 1.0' in metrics
    assert 'ampd_router_ttft_seconds_count{route="local",worker="decode-0"} 1.0' in metrics
    assert 'ampd_router_kv_bytes_moved_total{kind="remote"}' in metrics
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ampd.router.decisions"]
    assert [l["route"] for l in lines] == ["remote", "local"] and lines[1]["l_hist"] > 0


def test_prefill_queue_holds_work_so_the_engine_sees_one_prefill_at_a_time():
    async def main():
        async with RouterHarness(policy="disagg") as h:
            h.prefill[0].first_token_delay = 0.05
            outs = await asyncio.gather(*(h.chat(USER, session=f"q{i}") for i in range(4)))
            return [o[0] for o in outs], h.prefill[0].max_inflight, await h.metrics_text()

    statuses, max_inflight, metrics = run(main())
    assert statuses == [200] * 4 and max_inflight == 1
    assert 'ampd_router_queue_length{worker="prefill-0"} 0.0' in metrics


def test_client_disconnect_cancels_the_upstream_stream():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            d = h.decode[0]
            d.token_delay = 0.05
            body = {"model": MODEL, "messages": USER, "max_tokens": 200, "stream": True}
            async with aiohttp.ClientSession() as c:
                async with c.post(h.url + "/v1/chat/completions", json=body) as r:
                    await r.content.readline()
            for _ in range(100):
                if d.aborted:
                    break
                await asyncio.sleep(0.05)
            aborted, completed = d.aborted, d.completed
            status, _, _ = await h.chat(USER, session="after")  # the slot was released
            return aborted, completed, status, d.decoding_left if hasattr(d, "decoding_left") else None, h.router

    aborted, completed, status, _, router = run(main())
    assert aborted == 1 and completed == 0 and status == 200
    assert router.cluster.decode["decode-0"].decoding == 0


def test_dead_decode_worker_between_rounds_rebinds_and_prefills_in_full():
    async def main():
        async with RouterHarness(n_decode=2, policy="disagg") as h:
            _, out, h1 = await h.chat(USER, session="conv")
            first = h1["x-ampd-decode"]
            engine = h.decode[int(first[-1])]
            await engine.stop()  # killed between rounds; the router notices on its next call
            msgs = USER + [out["choices"][0]["message"], {"role": "user", "content": "more"}]
            status, out2, h2 = await h.chat(msgs, session="conv", stream=True)
            return first, status, out2, h2, h.prefill[0].requests, await h.metrics_text(), msgs

    first, status, out2, h2, p_reqs, metrics, msgs = run(main())
    assert status == 200 and out2 == expected(msgs) and h2["x-ampd-decode"] != first
    assert ampd_params(p_reqs[-1]).get("history") is None  # full prefill: the history died with its worker
    xfers = [ampd_params(r)["xfer"] for r in p_reqs]
    assert len(set(xfers)) == len(xfers)  # a retried round is a new transfer
    assert f'ampd_router_worker_up{{kind="decode",worker="{first}"}} 0.0' in metrics
    assert "ampd_router_session_rebinds_total" in metrics


def test_dead_prefill_worker_falls_back_to_local():
    async def main():
        async with RouterHarness(policy="disagg") as h:
            await h.prefill[0].stop()
            status, out, headers = await h.chat(USER, session="s")
            return status, out, headers

    status, out, headers = run(main())
    assert status == 200 and headers["x-ampd-route"] == "local"
    assert out["choices"][0]["message"]["content"] == expected(USER)


def test_prefill_error_falls_back_to_decode_computing_everything():
    async def main():
        async with RouterHarness(policy="disagg") as h:
            h.prefill[0].fail_status = 500
            status, out, _ = await h.chat(USER, session="s")
            return status, out, h.decode[0].requests

    status, out, d_reqs = run(main())
    assert status == 200 and out["choices"][0]["message"]["content"] == expected(USER)
    assert ampd_params(d_reqs[0])["role"] == "local"


def test_upstream_timeout_is_a_504():
    async def main():
        async with RouterHarness(policy="colocated", read_timeout_s=0.3) as h:
            h.decode[0].first_token_delay = 2.0
            return await h.chat(USER, session="s")

    status, out, _ = run(main())
    assert status == 504 and out["error"]["code"] == "upstream_timeout"


def test_all_decode_workers_dead_is_a_503():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            await h.decode[0].stop()
            status, out, _ = await h.chat(USER, session="s")
            async with h.client.get(h.url + "/health") as r:
                return status, out, r.status

    status, out, health = run(main())
    assert status == 503 and out["error"]["type"] == "service_unavailable" and health == 503


async def _post_raw(h, data: bytes, path="/v1/chat/completions", headers=None):
    async with h.client.post(h.url + path, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("data,status,code", [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (json.dumps({"model": "other-model", "messages": USER}).encode(), 404, "model_not_found"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "empty_prompt"),
    (json.dumps({"model": MODEL}).encode(), 400, "empty_prompt"),
    (json.dumps({"model": MODEL, "messages": ["x"]}).encode(), 400, "invalid_field"),
    (json.dumps({"model": MODEL, "messages": USER, "stream": "yes"}).encode(), 400, "invalid_field"),
    (json.dumps({"model": MODEL, "messages": USER, "max_tokens": 0}).encode(), 400, "invalid_field"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x " * 5000}]}).encode(), 400,
     "context_length_exceeded"),
])
def test_bad_chat_input_gets_an_openai_error(data, status, code):
    async def main():
        async with RouterHarness(policy="colocated") as h:
            out = await _post_raw(h, data)
            return out, h.decode[0].requests

    (got_status, body), reqs = run(main())
    assert got_status == status and body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert reqs == []  # nothing reached an engine


def test_bad_completion_input_oversize_body_and_unknown_paths():
    async def main():
        async with RouterHarness(policy="colocated", max_body_bytes=1000) as h:
            empty = await _post_raw(h, json.dumps({"model": MODEL, "prompt": ""}).encode(), "/v1/completions")
            mixed = await _post_raw(h, json.dumps({"prompt": [1, "a"]}).encode(), "/v1/completions")
            big = await _post_raw(h, json.dumps({"prompt": "x" * 5000}).encode(), "/v1/completions")
            missing = await _post_raw(h, b"{}", "/v1/nothing")
            async with h.client.get(h.url + "/v1/chat/completions") as r:
                wrong_method = r.status
            ok = await _post_raw(h, json.dumps({"prompt": "no model field"}).encode(), "/v1/completions")
            return empty, mixed, big, missing, wrong_method, ok

    empty, mixed, big, missing, wrong_method, ok = run(main())
    assert empty[0] == 400 and empty[1]["error"]["param"] == "prompt"
    assert mixed[0] == 400
    assert big[0] == 413 and big[1]["error"]["code"] == "oversize"
    assert missing[0] == 404 and "error" in missing[1]
    assert wrong_method == 405
    assert ok[0] == 200  # a request without "model" goes to the served model, as with vLLM


def test_api_key_is_required_when_set_and_never_logged(caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        async with RouterHarness(policy="colocated", api_key="s3cret-key") as h:
            no_key = await h.chat(USER)
            bad_key = await h.chat(USER, headers={"Authorization": "Bearer nope"})
            good = await h.chat(USER, headers={"Authorization": "Bearer s3cret-key"})
            async with h.client.get(h.url + "/health") as r:
                health = r.status
            return no_key[0], bad_key[0], good[0], health, h.decode[0].requests, h.router.cfg.redacted()

    no_key, bad_key, good, health, reqs, redacted = run(main())
    assert (no_key, bad_key, good, health) == (401, 401, 200, 200)
    assert "s3cret-key" not in caplog.text and redacted["api_key"] == "***"
    assert all("s3cret-key" not in json.dumps(r) for r in reqs)


def test_models_and_health_endpoints():
    async def main():
        async with RouterHarness(n_prefill=2, policy="ampd") as h:
            async with h.client.get(h.url + "/v1/models") as r:
                models = await r.json()
            async with h.client.get(h.url + "/health") as r:
                health = await r.json()
            return models, health

    models, health = run(main())
    assert models["data"][0]["id"] == MODEL
    assert health["status"] == "ok" and set(health["workers"]) == {"prefill-0", "prefill-1", "decode-0"}


def test_health_checks_take_a_worker_out_and_back():
    async def main():
        async with RouterHarness(n_prefill=1, policy="disagg") as h:
            p = h.prefill[0]
            p.healthy = False
            await asyncio.sleep(0.6)
            _, _, during = await h.chat(USER, session="a")
            p.healthy = True
            await asyncio.sleep(0.6)
            _, _, after = await h.chat(USER, session="b")
            return during["x-ampd-route"], after["x-ampd-route"]

    assert run(main()) == ("local", "remote")


def test_kv_pressure_migrates_the_session_to_another_decode_worker():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", decode_kv_tokens=400) as h:
            msgs = [{"role": "user", "content": "x " * 300}]  # ~150 estimated tokens
            _, out, h1 = await h.chat(msgs, session="m", max_tokens=8)
            first = h1["x-ampd-decode"]
            h.router.cluster.decode[first].kv_used_tokens = 390  # the worker fills up with other sessions
            msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "go on"}]
            status, out2, h2 = await h.chat(msgs, session="m", max_tokens=8)
            new = h2["x-ampd-decode"]
            return first, new, status, out2, msgs, h.decode[int(new[-1])].requests[-1], h.router

    first, new, status, out2, msgs, req, router = run(main())
    assert new != first and status == 200 and out2["choices"][0]["message"]["content"] == expected(msgs)
    p = ampd_params(req)
    assert p["role"] == "decode" and p["history"]["from"] == router.eps[first].url and p["history"]["tokens"] > 0
    assert router.cluster.bindings["m"] == new


class IdTokenizer:
    """Whitespace 'tokenizer' with ids, so balanced PD (which sends token ids) can run against fakes."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_balanced_pd_sends_the_first_share_as_token_ids():
    from ampd_plugin.router.sessions import PromptCounter

    async def main():
        async with RouterHarness(policy="disagg", balanced_pd_share=0.5, counter=PromptCounter(IdTokenizer())) as h:
            msgs = [{"role": "user", "content": "a b c d e f g h i j"}]
            status, out, headers = await h.chat(msgs, session="b")
            return status, out, headers, h.prefill[0].requests, h.decode[0].requests, msgs

    status, out, headers, p_reqs, d_reqs, msgs = run(main())
    assert status == 200 and out["choices"][0]["message"]["content"] == expected(msgs)
    assert headers["x-ampd-route"] == "balanced"
    n = len("user: a b c d e f g h i j".split())
    assert len(p_reqs[0]["prompt"]) == n // 2 and p_reqs[0]["max_tokens"] == 1
    assert ampd_params(p_reqs[0])["role"] == "prefill" and ampd_params(d_reqs[0])["role"] == "decode"


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": {"nested": ["x"]}}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
    {"messages": [{"role": "user", "content": None}], "tools": "not-a-list"},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
    {"messages": [{"role": 5}]},
    {"messages": "hello"},
    {"prompt": [[1, 2], [3]]},
    {"messages": [{"role": "user", "content": "hi"}], "session_id": {"x": 1}, "user": ["y"]},
    {"messages": [{"role": "user", "content": "\udcff\u0000 odd"}]},
])
def test_odd_input_never_crashes_the_router(body):
    async def main():
        async with RouterHarness(policy="ampd") as h:
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            async with h.client.post(h.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}) as r:
                status, out = r.status, await r.json(content_type=None)
            ok_after, _, _ = await h.chat(USER, session="after")
            return status, out, ok_after

    status, out, ok_after = run(main())
    assert status in (200, 400) and ok_after == 200
    if status == 400:
        assert set(out["error"]) == {"message", "type", "param", "code"}


def test_ampd_reorders_the_prefill_queue_and_the_engine_runs_that_order():
    """Algorithm 2 live: behind a running prefill, a long task that cannot meet the TTFT SLO anyway is
    overtaken by two short ones; the prefill worker receives them in the policy's order. A first round
    ("W") gives the prefill worker a known, low TTFT window (an empty window on a busy worker is unknown,
    not slack, and would send the long task elsewhere)."""

    async def main():
        async with RouterHarness(policy="ampd", ttft_slo=0.5, itl_slo=10.0) as h:
            h.prefill[0].first_token_delay = 0.15
            contents = {"W": "warm up", "A": "first short one", "L": "long " * 480, "S1": "short one", "S2": "short two"}

            async def send(name, delay):
                await asyncio.sleep(delay)
                return await h.chat([{"role": "user", "content": contents[name]}], session=name)

            assert (await send("W", 0))[0] == 200
            outs = await asyncio.gather(send("A", 0), send("L", 0.03), send("S1", 0.06), send("S2", 0.09))
            order = [next(k for k, v in contents.items() if r["messages"][0]["content"] == v)
                     for r in h.prefill[0].requests]
            return [o[0] for o in outs], order, await h.metrics_text()

    statuses, order, metrics = run(main())
    assert statuses == [200] * 4
    assert order == ["W", "A", "S1", "S2", "L"]
    assert 'ampd_router_reorderings_total{worker="prefill-0"} 2.0' in metrics  # S1 and S2 both overtook L


def test_stream_usage_chunk_gives_the_exact_resident_token_count():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            status, text, _ = await h.chat(USER, session="u", stream=True, max_tokens=7,
                                           stream_options={"include_usage": True})
            s = h.router.sessions.get("u", True)
            return status, text, s.resident_tokens, h.router.cluster.decode["decode-0"].kv_used_tokens

    status, text, resident, used = run(main())
    prompt_tokens = max(1, len("user: hello there, tell me a story\n".encode()) // 4)
    assert status == 200 and text == expected(USER, 7)
    assert resident == prompt_tokens + 7 == used
