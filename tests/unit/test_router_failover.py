"""Mid-stream failover against the real router and fake engines: a decode worker that dies or stalls while
streaming does not cut the client's answer; the same stream continues on another decode worker and reads
exactly what one uninterrupted run gives (the fake model is autoregressive, like a greedy engine)."""

import asyncio
import json

import pytest
from router_fakes import MODEL, RouterHarness, answer_tokens, prompt_key, run

from ampd_plugin.router.failover import why_not
from ampd_plugin.router.stream_tokens import StreamTokens

USER = [{"role": "user", "content": "hello there"}]


def _reference(messages, n):
    return "".join(answer_tokens(prompt_key({"messages": messages}), n))


async def _stream(h, path, body, session=None):
    """(status, raw bytes, parsed events) of one streamed request."""
    headers = {"X-Session-ID": session} if session else {}
    async with h.client.post(h.url + path, json=body, headers=headers) as r:
        raw = await r.read()
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    return r.status, raw, events


def _chat_text(events):
    return "".join((c.get("delta") or {}).get("content") or "" for e in events for c in e.get("choices", []))


@pytest.mark.parametrize("fault", ["die", "stall"])
def test_a_chat_stream_continues_on_another_worker_and_equals_one_run(fault):
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", stall_timeout_s=0.5) as h:
            await h.chat(USER, session="s")
            victim = h.router.cluster.bindings["s"]
            engine = h.decode[int(victim[-1])]
            setattr(engine, f"{fault}_after_tokens", 5)
            msgs = USER + [{"role": "user", "content": "go"}]
            body = {"model": MODEL, "messages": msgs, "max_tokens": 20, "stream": True,
                    "stream_options": {"include_usage": True}}
            status, raw, events = await _stream(h, "/v1/chat/completions", body, "s")
            engine.die_after_tokens = engine.stall_after_tokens = None
            nxt = await h.chat(msgs + [{"role": "user", "content": "next"}], session="s", stream=True)
            metrics = await h.metrics_text()
            return victim, status, raw, events, nxt, metrics, h.router.cluster.bindings["s"]

    victim, status, raw, events, nxt, metrics, bound = run(main())
    msgs = USER + [{"role": "user", "content": "go"}]
    assert status == 200 and b"error" not in raw and raw.rstrip().endswith(b"data: [DONE]")
    assert _chat_text(events) == _reference(msgs, 20)  # one answer, no token lost or repeated
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1  # the client's stream keeps its id
    assert b"token_ids" not in raw  # the router asked for them; the client did not
    usage = [e["usage"] for e in events if e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 20
    assert [e["choices"][0].get("finish_reason") for e in events if e.get("choices")][-1] == "length"
    assert bound != victim and nxt[0] == 200  # the session lives on where it was continued
    assert f'ampd_router_stream_failovers_total{{outcome="continued",worker="{victim}"}} 1.0' in metrics


def test_a_completion_stream_continues_with_the_default_max_tokens():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated") as h:
            for engine in h.decode:
                engine.die_after_tokens = 6  # both would die at token 6; the continuation runs fewer than 6
            body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 10, "stream": True}
            return await _stream(h, "/v1/completions", body)

    status, raw, events = run(main())
    text = "".join(c.get("text") or "" for e in events for c in e.get("choices", []))
    assert status == 200 and b"error" not in raw
    assert text == "".join(answer_tokens(json.dumps("once upon a time"), 10))
    assert all(e["object"] == "text_completion" for e in events)


def test_a_client_that_asked_for_token_ids_keeps_them_across_the_failover():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated") as h:
            await h.chat(USER, session="s")
            h.decode[int(h.router.cluster.bindings["s"][-1])].die_after_tokens = 3
            body = {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True, "return_token_ids": True}
            return await _stream(h, "/v1/chat/completions", body, "s")

    status, raw, events = run(main())
    ids = [i for e in events for c in e.get("choices", []) for i in (c.get("token_ids") or [])]
    assert status == 200 and len(ids) == 8
    assert any("prompt_token_ids" in e for e in events)


def test_limit_and_no_other_worker_end_the_stream_with_a_clean_error():
    async def main():
        out = []
        async with RouterHarness(n_decode=1, policy="colocated") as h:  # nowhere to continue
            h.decode[0].die_after_tokens = 3
            out.append(await _stream(h, "/v1/chat/completions",
                                     {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True}))
            out.append(await h.metrics_text())
        async with RouterHarness(n_decode=3, policy="colocated", failover_limit=1) as h:  # the continuation dies too
            for engine in h.decode:
                engine.die_after_tokens = 3
            out.append(await _stream(h, "/v1/chat/completions",
                                     {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True}))
            out.append(await h.metrics_text())
        return out

    (s1, raw1, _), m1, (s2, raw2, ev2), m2 = run(main())
    assert s1 == 200 and b'"code": "stream_broken"' in raw1
    assert 'ampd_router_stream_failovers_total{outcome="no_worker",worker="decode-0"} 1.0' in m1
    assert s2 == 200 and b'"code": "stream_broken"' in raw2 and len(_chat_text(ev2).split()) == 6  # 3 + 3 tokens
    assert 'outcome="limit"' in m2 and 'outcome="continued"' in m2


def test_requests_a_continuation_cannot_reproduce_are_not_failed_over():
    assert why_not({"stream": True, "max_tokens": 5}, True) is None
    assert why_not({"stream": True, "response_format": {"type": "text"}}, True) is None
    assert why_not({"stream": False}, True) == "not streamed"
    for extra, why in [({"n": 2}, "n > 1"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
                       ({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"presence_penalty": 0.5}, "presence_penalty"), ({"tool_choice": "auto"}, "tool_choice"),
                       ({"echo": True}, "echo")]:
        assert why_not({"stream": True, **extra}, False) == why

    async def main():
        async with RouterHarness(n_decode=2, policy="colocated") as h:
            h.decode[0].die_after_tokens = h.decode[1].die_after_tokens = 3
            status, raw, _ = await _stream(h, "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 8,
                                                                      "stream": True, "logprobs": True})
            return status, raw, [r.get("return_token_ids") for e in h.decode for r in e.requests]

    status, raw, asked = run(main())
    assert status == 200 and b'"code": "stream_broken"' in raw and not any(asked)


def test_stream_tokens_reads_and_strips_ids_without_parsing():
    t = StreamTokens(strip=True)
    first = b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"prompt_token_ids":[1,2,3]}'
    assert t.observe(first) == b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    ev = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" a"},"token_ids":[7,8]}],"prompt_token_ids":null}'
    assert t.observe(ev) == b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" a"}}]}'
    assert t.prompt_ids == [1, 2, 3] and t.generated == [7, 8]
    keep = StreamTokens(strip=False)
    assert keep.observe(ev) == ev and keep.generated == [7, 8]
    # a chunk vLLM sends only because ids were asked for (a token with no text yet) does not reach the client
    empty = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":null,"token_ids":[9]}]}'
    assert t.observe(empty) is None and t.generated == [7, 8, 9]


def test_a_stream_whose_worker_never_answers_runs_on_another_worker():
    async def main():
        async with RouterHarness(n_decode=2, policy="colocated", stall_timeout_s=0.5) as h:
            await h.chat(USER, session="s")
            victim = h.router.cluster.bindings["s"]
            h.decode[int(victim[-1])].hang_before_headers = True  # stopped: connection accepted, no answer
            msgs = USER + [{"role": "user", "content": "go"}]
            got = await h.chat(msgs, session="s", stream=True, max_tokens=10)
            return victim, got, h.router.cluster.bindings["s"]

    victim, (status, text, headers), bound = run(main())
    msgs = USER + [{"role": "user", "content": "go"}]
    assert status == 200 and text == _reference(msgs, 10)
    assert headers["x-ampd-decode"] != victim and bound != victim
