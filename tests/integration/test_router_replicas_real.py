"""Two router replicas sharing state through a real Redis server, in front of the real vLLM-CPU workers.

One conversation's rounds alternate between replicas A and B: every answer equals the plain instance's, and
every later round on either replica reuses the history the other one built (l_hist > 0 in its decision log).
Then A is SIGKILLed in the middle of a streamed round; the client retries on B, which waits out A's session
lock and continues the conversation with its history. Negative control: a router without `--state` knows
nothing of the conversation (l_hist = 0).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.request

import pytest

from ampd_plugin.local_redis import RedisServer
from test_router_real import RouterProc, answer, chat_body, post  # noqa: E402 - rootdir mode


pytestmark = pytest.mark.integration

LOCK_TTL_S = 2


@pytest.fixture(scope="module")
def replicas(pd_cluster, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("replica-logs")
    cfg = log_dir / "router.yaml"
    cfg.write_text(f"state_lock_ttl_s: {LOCK_TTL_S}\n")
    c = pd_cluster
    made = {}
    with RedisServer() as redis_srv:
        try:
            for rid in ("A", "B"):
                made[rid] = RouterProc([c.prefill.url], [c.decode.url], "disagg", c.model, log_dir,
                                       "--state", redis_srv.url, "--replica-id", rid, "--config", str(cfg))
            made["alone"] = RouterProc([c.prefill.url], [c.decode.url], "disagg", c.model, log_dir)
            yield made
        finally:
            for r in made.values():
                r.stop()


def _rounds(router: RouterProc, session: str) -> list[dict]:
    time.sleep(0.5)  # the decision line is written when the round settles, just after the reply
    return [json.loads(line[line.index("{"):]) for line in router.log_path.read_text().splitlines()
            if '"event":"round"' in line and f'"{session}"' in line]


def _ref(plain_url: str, messages: list[dict]) -> str:
    return answer(*post(plain_url, "/v1/chat/completions", chat_body(messages))[:2], False)


def _next(messages: list[dict], got: str, k: int) -> list[dict]:
    return messages + [{"role": "assistant", "content": got},
                       {"role": "user", "content": f"Round {k + 2}: the search found {k * 5 + 2} more documents."}]


def test_rounds_alternate_between_replicas_and_reuse_each_others_history(pd_cluster, replicas):
    plain = pd_cluster.plain.url
    session = "replica-conv"
    messages = [{"role": "user", "content": "Replicas: outline a research plan about coral reefs in four steps."}]
    order = ["A", "B", "A", "B"]
    for k, rid in enumerate(order):
        ref = _ref(plain, messages)
        stream = k % 2 == 1
        status, out, hdrs = post(replicas[rid].url, "/v1/chat/completions", chat_body(messages, stream),
                                 {"X-Session-ID": session})
        got = answer(status, out, stream)
        assert got == ref, f"round {k} on {rid} via {hdrs.get('x-ampd-route')}: {got!r} != plain {ref!r}"
        messages = _next(messages, got, k)
    a, b = _rounds(replicas["A"], session), _rounds(replicas["B"], session)
    assert [r["round"] for r in a] == [0, 2] and [r["round"] for r in b] == [1, 3], (a, b)
    assert a[0]["l_hist"] == 0 and all(r["l_hist"] > 0 for r in a[1:] + b), (a, b)
    # negative control: an unshared router sees this session's next round as its first
    status, out, _ = post(replicas["alone"].url, "/v1/chat/completions", chat_body(messages),
                          {"X-Session-ID": session})
    assert answer(status, out, False) == _ref(plain, messages)
    alone = _rounds(replicas["alone"], session)
    assert len(alone) == 1 and alone[0]["l_hist"] == 0 and alone[0]["round"] == 0, alone
    with urllib.request.urlopen(replicas["B"].url + "/health", timeout=10) as r:
        state = json.loads(r.read())["state"]
    assert state["connected"] is True and state["replicas"] == 2, state


def test_replica_killed_mid_stream_the_session_continues_on_the_other(pd_cluster, replicas):
    plain = pd_cluster.plain.url
    session = "replica-kill"
    messages = [{"role": "user", "content": "Failover between replicas: describe how a lighthouse works."}]
    status, out, _ = post(replicas["A"].url, "/v1/chat/completions", chat_body(messages), {"X-Session-ID": session})
    messages = _next(messages, answer(status, out, False), 0)
    body = json.dumps({**chat_body(messages, stream=True), "max_tokens": 200}).encode()
    req = urllib.request.Request(replicas["A"].url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", "X-Session-ID": session})
    killed_after, finished = None, False
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in iter(r.readline, b""):
                if killed_after is None and line.startswith(b"data: {") and b'"content"' in line:
                    os.killpg(replicas["A"].proc.pid, signal.SIGKILL)
                    killed_after = line
                finished = line.strip() == b"data: [DONE]" or finished
    except (OSError, http.client.HTTPException):  # the connection breaks when A dies
        pass
    assert killed_after is not None and not finished, "A was not killed in the middle of the stream"
    replicas["A"].proc.wait(10)
    time.sleep(0.5)
    t0 = time.monotonic()
    status, out, _ = post(replicas["B"].url, "/v1/chat/completions", chat_body(messages), {"X-Session-ID": session})
    waited = time.monotonic() - t0
    assert answer(status, out, False) == _ref(plain, messages)
    assert waited < LOCK_TTL_S + 30, waited
    b = _rounds(replicas["B"], session)
    assert len(b) == 1 and b[0]["ok"] and b[0]["round"] == 1 and b[0]["l_hist"] > 0, b
