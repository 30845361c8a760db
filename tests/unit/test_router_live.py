"""The live router's signals: TTFT at the first token, a TPOT sample for every round, the client that
leaves at [DONE], one round per session at a time, `conversation_id`, the KV ledger on a rewrite."""

import asyncio
import json
import logging

import openai
import pytest
from router_fakes import MODEL, RouterHarness, answer_tokens, prompt_key, run

USER = [{"role": "user", "content": "hello there, tell me a story"}]


def rounds_logged(caplog):
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "ampd.router.decisions"]


def test_ttft_is_recorded_when_the_first_token_arrives_not_when_the_stream_ends():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            h.decode[0].token_delay = 0.25  # 8 tokens: the stream lasts ~2 s
            d = h.router.cluster.decode["decode-0"]
            body = {"model": MODEL, "messages": USER, "max_tokens": 8, "stream": True}
            async with h.client.post(h.url + "/v1/chat/completions", json=body, headers={"X-Session-ID": "s"}) as r:
                async for line in r.content:
                    if b'"content":" w' in line:
                        break  # the first token reached the client
                await asyncio.sleep(0.1)
                during = (len(d.ttft), h.decode[0].active, len(d.itl))
                await r.read()
            return during, len(d.ttft), len(d.itl)

    (ttft_during, engine_active, itl_during), ttft_after, itl_after = run(main())
    assert engine_active == 1  # the engine is still streaming ...
    assert ttft_during == 1  # ... and the TTFT sample is already in the window
    assert itl_during == 0 and itl_after == 1 and ttft_after == 1  # TPOT at the end, TTFT not twice


@pytest.mark.parametrize("policy", ["colocated", "disagg"])
def test_non_streaming_rounds_give_a_tpot_sample_and_a_ttft_sample(policy, caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy=policy) as h:
            h.decode[0].token_delay = 0.05
            status, out, _ = await h.chat(USER, session="s", max_tokens=8)
            c = h.router.cluster
            return status, out, len(c.decode["decode-0"].itl), c.decode["decode-0"].itl.mean(c.now + 1), \
                len(c.prefill["prefill-0"].ttft), len(c.decode["decode-0"].ttft)

    status, out, n_itl, itl, n_ttft_p, n_ttft_d = run(main())
    assert status == 200 and out["usage"]["completion_tokens"] == 8
    assert n_itl == 1 and 0 < itl < 0.2  # (t_done - t_first) / (n_out - 1)
    (log,) = rounds_logged(caplog)
    assert log["tpot_ms"] is not None and log["ttft_ms"] is not None
    if policy == "disagg":  # TTFT at the prefill worker's answer, attributed to it
        assert (n_ttft_p, n_ttft_d, log["ttft_source"], log["prefilled_on"]) == (1, 0, "prefill", "prefill-0")
    else:  # the decode worker's first token is invisible: dispatch + predicted prefill, to D
        assert (n_ttft_p, n_ttft_d, log["ttft_source"], log["prefilled_on"]) == (0, 1, "predicted", "decode-0")


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_a_remote_plan_that_falls_back_to_local_is_attributed_to_the_decode_worker(share, caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        from test_router_server import IdTokenizer  # balanced PD needs token ids

        from ampd_plugin.router.sessions import PromptCounter

        async with RouterHarness(policy="disagg", balanced_pd_share=share, counter=PromptCounter(IdTokenizer())) as h:
            h.prefill[0].fail_status = 500
            status, text, headers = await h.chat(USER, session="s", stream=True)
            c = h.router.cluster
            return status, headers, len(c.prefill["prefill-0"].ttft), len(c.decode["decode-0"].ttft)

    status, headers, n_p, n_d = run(main())
    assert status == 200 and (n_p, n_d) == (0, 1)
    assert headers["x-ampd-route"] == ("balanced" if share else "remote")
    (log,) = rounds_logged(caplog)
    assert log["fallback"] == "prefill-5xx" and log["prefilled_on"] == "decode-0"


def test_a_client_that_leaves_right_after_done_completes_the_round(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="colocated") as h:
            h.decode[0].tail_delay = 2.0  # the engine ends its stream well after [DONE]
            msgs = list(USER)
            for _ in range(2):
                body = {"model": MODEL, "messages": msgs, "max_tokens": 8, "stream": True}
                async with h.client.post(h.url + "/v1/chat/completions", json=body,
                                         headers={"X-Session-ID": "s"}) as r:
                    async for line in r.content:
                        if line.strip() == b"data: [DONE]":
                            break
                    r.close()  # leave at once, like the OpenAI SDK
                msgs = msgs + [{"role": "assistant", "content": "".join(answer_tokens(prompt_key({"messages": msgs}), 8))},
                               {"role": "user", "content": "more"}]
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.5)  # the router drains the engine's end
            return h.decode[0].aborted, h.decode[0].completed

    aborted, completed = run(main())
    logs = rounds_logged(caplog)
    assert [r["ok"] for r in logs] == [True, True]
    assert logs[1]["l_hist"] > 0 and logs[0]["tpot_ms"] is not None and logs[0]["out_tokens"] == 8
    assert (aborted, completed) == (0, 2)  # drained, not aborted


def test_openai_sdk_five_streaming_rounds_reuse_the_history(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="ampd") as h:
            h.decode[0].tail_delay = 0.5
            client = openai.AsyncOpenAI(base_url=h.url + "/v1", api_key="none", max_retries=0)
            msgs = [{"role": "user", "content": "hello"}]
            texts = []
            for i in range(5):
                stream = await client.chat.completions.create(
                    model=MODEL, messages=msgs, max_tokens=8, stream=True, temperature=0,
                    stream_options={"include_usage": True}, extra_headers={"X-Session-ID": "sdk"})
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                texts.append((text, "".join(answer_tokens(prompt_key({"messages": msgs}), 8))))
                msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"go on {i}"}]
            await client.close()
            return texts

    texts = run(main())
    assert all(got == want for got, want in texts)
    logs = rounds_logged(caplog)
    assert len(logs) == 5 and all(r["ok"] for r in logs) and all(r["out_tokens"] == 8 for r in logs)
    assert logs[0]["l_hist"] == 0 and all(r["l_hist"] > 0 for r in logs[1:])
    assert all(r["tpot_ms"] is not None and r["ttft_ms"] is not None for r in logs)


def test_two_rounds_of_one_session_are_serialised():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            h.decode[0].token_delay = 0.05
            a, b = await asyncio.gather(h.chat(USER, session="s", stream=True), h.chat(USER, session="s"))
            return a[0], b[0], h.decode[0].max_inflight, len(h.router.rounds.locks)

    sa, sb, max_inflight, locks_left = run(main())
    assert (sa, sb) == (200, 200) and max_inflight == 1 and locks_left == 0


def test_a_round_waiting_too_long_for_its_session_gets_409():
    async def main():
        async with RouterHarness(policy="colocated", session_wait_s=0.2) as h:
            h.decode[0].token_delay = 0.2
            first = asyncio.create_task(h.chat(USER, session="s", stream=True))
            await asyncio.sleep(0.3)
            second = await h.chat(USER, session="s")
            other = await h.chat(USER, session="t")  # other sessions are not held up
            return (await first)[0], second, other[0]

    first, (status, body, _), other = run(main())
    assert first == 200 and other == 200
    assert status == 409 and body["error"]["code"] == "session_busy"


def test_conversation_id_identifies_the_session_and_is_not_forwarded(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")

    async def main():
        async with RouterHarness(policy="colocated") as h:
            msgs = list(USER)
            for _ in range(2):
                _, out, _ = await h.chat(msgs, conversation_id="conv-7")
                msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "and?"}]
            await h.chat(USER, headers={"X-Session-ID": "hdr"}, conversation_id="conv-7")
            return h.decode[0].requests

    reqs = run(main())
    logs = rounds_logged(caplog)
    assert [r["session"] for r in logs] == ["conv-7", "conv-7", "hdr"]  # the header comes first
    assert logs[1]["l_hist"] > 0
    assert all("conversation_id" not in r for r in reqs)


def test_a_rewritten_history_releases_its_kv_in_the_ledger():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            d = h.router.cluster.decode["decode-0"]
            await h.chat(USER, session="a")
            await h.chat([{"role": "user", "content": "x" * 400}], session="b")
            before = d.kv_used_tokens
            b = h.router.sessions.get("b", True)
            b_before = b.resident_tokens
            await h.chat([{"role": "user", "content": "short and new"}], session="b")  # not an extension
            return before, b_before, d.kv_used_tokens, b.resident_tokens, h.router.sessions.get("a", True).resident_tokens

    before, b_before, after, b_after, a_resident = run(main())
    assert after == a_resident + b_after  # the ledger equals the sum of what sessions hold
    assert after < before and b_after < b_before
