"""What the router learns from the real KV plane (shared `pd_cluster`: P and D with the `ampd` connector).

- A chat template that drops earlier assistant turns' `<think>…</think>` re-renders the history, so the new
  prompt is not an extension of what D holds: the router claims only the longest common prefix (the old
  rule claimed the whole residency, or nothing once the prompt stopped extending the last one), and every
  round stays greedy-equal to the plain instance.
- A history D had evicted is recomputed there for P's export; the connector says so and the router counts
  it, drops that residency and logs it with the round.
- D's connector publishes its retention TTL on /metrics and the router's residency follows it.
- Without a cluster secret the connector still moves KV on one host and says at start-up that it is
  unauthenticated; an engine with the secret refuses that engine's unsigned descriptor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_router_real import RouterProc, post

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W
from ampd_plugin.connector.auth import SECRET_ENV, SECRET_FILE_ENV

pytestmark = pytest.mark.integration

MAX_TOKENS = 12
STRIP = {"strip_earlier_thinking": True}  # the tiny model's template switch (tiny_model.CHAT_TEMPLATE)
THINK = "<think>" + "First weigh the options, the costs and the weather on each day. " * 12 + "</think>"


def body(messages, stream=False):
    return {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "stream": stream,
            "chat_template_kwargs": STRIP}


def text(status, out, stream):
    assert status == 200, out
    return out if stream else out["choices"][0]["message"]["content"]


def decisions(router: RouterProc, session: str) -> list[dict]:
    out = []
    for line in Path(router.log_path).read_text().splitlines():
        _, sep, payload = line.partition(" ampd.router.decisions ")
        if sep:
            d = json.loads(payload)
            if d.get("session") == session:
                out.append(d)
    return out


def metric(router: RouterProc, name: str, **labels) -> float:
    return lc.metric_sum(lc.scrape_metrics(router.url, prefix="ampd_router_"), name, **labels)


@pytest.fixture(scope="module")
def signal_routers(pd_cluster, tmp_path_factory):
    c = pd_cluster
    log_dir = tmp_path_factory.mktemp("signal-routers")
    made = {}
    try:
        made["remote"] = RouterProc([c.prefill.url], [c.decode.url], "disagg", c.model, log_dir)
        made["local"] = RouterProc([c.prefill.url], [c.decode.url], "colocated", c.model, log_dir)
        yield made
    finally:
        for r in made.values():
            r.stop()


@pytest.mark.parametrize("regime", ["remote", "local"])
def test_a_template_that_drops_earlier_thinking_reuses_the_longest_common_prefix(pd_cluster, signal_routers, regime):
    router, c = signal_routers[regime], pd_cluster
    session = f"think-{regime}"
    messages = [{"role": "user", "content": "Plan a three day trip along the coast with a budget. " * 14}]
    for k in range(3):
        stream = k == 1
        lc.reset_prefix_cache(c.prefill.url)  # P starts cold: a remote round must read its history from D
        ref = text(*post(c.plain.url, "/v1/chat/completions", body(messages))[:2], False)
        status, out, hdrs = post(router.url, "/v1/chat/completions", body(messages, stream), {"X-Session-ID": session})
        got = text(status, out, stream)
        assert got == ref, f"round {k} ({hdrs.get('x-ampd-route')}): {got!r} != plain {ref!r}"
        # The client sends its first answer back with the reasoning a reasoning model would have produced;
        # the template keeps it while that turn is the latest and drops it afterwards.
        messages = messages + [{"role": "assistant", "content": (THINK + got) if k == 0 else got},
                               {"role": "user", "content": f"Round {k + 2}: now the day by day list."}]
    r1, r2, r3 = decisions(router, session)
    assert all(d["ok"] for d in (r1, r2, r3)) and r1["l_hist"] == 0
    prompt1 = r1["l_incr"]  # round 1's whole prompt: the longest prefix the later prompts share with D
    # Round 2 extends round 1's prompt but not its answer (the reasoning comes first): the old rule claimed
    # prompt1 + 12 generated tokens. Round 3 re-renders turn 1 without it, so the prompt no longer extends
    # round 2's: the old rule claimed nothing. Both share exactly round 1's prompt with what D holds.
    assert r2["l_hist"] == prompt1 - 1 and r3["l_hist"] == prompt1 - 1
    if regime == "remote":
        assert r2["route"] == r3["route"] == "remote"
        assert r2["history_recomputed"] is None and r3["history_recomputed"] is None  # nothing over-claimed
        assert metric(router, "ampd_router_kv_bytes_moved_total", kind="history_read") > 0


def test_an_evicted_history_is_reported_and_learned(pd_cluster, signal_routers):
    router, c = signal_routers["remote"], pd_cluster
    session = "evicted-through-router"
    messages = [{"role": "user", "content": "Summarise the harbour's history in detail for a visitor. " * 14}]
    ref = text(*post(c.plain.url, "/v1/chat/completions", body(messages))[:2], False)
    assert text(*post(router.url, "/v1/chat/completions", body(messages), {"X-Session-ID": session})[:2], False) == ref
    messages = messages + [{"role": "assistant", "content": ref}, {"role": "user", "content": "And its lighthouse?"}]
    # D loses the session's blocks (its pins and its prefix cache), P has never had them.
    assert lc.reset_prefix_cache(c.decode.url) and lc.reset_prefix_cache(c.decode.url)
    assert lc.reset_prefix_cache(c.prefill.url)
    before = metric(router, "ampd_router_history_recomputed_tokens_total", worker="decode-0")
    ref = text(*post(c.plain.url, "/v1/chat/completions", body(messages))[:2], False)
    got = text(*post(router.url, "/v1/chat/completions", body(messages), {"X-Session-ID": session})[:2], False)
    assert got == ref
    r1, r2 = decisions(router, session)
    assert r2["route"] == "remote" and r2["l_hist"] > c.block_size and r2["history_recomputed"] >= c.block_size
    assert metric(router, "ampd_router_history_recomputed_tokens_total", worker="decode-0") - before \
        == r2["history_recomputed"]
    assert metric(router, "ampd_router_residency_dropped_total", reason="evicted") >= 1


def test_the_decode_engine_publishes_its_retention_ttl(pd_cluster):
    page = lc.scrape_metrics(pd_cluster.decode.url)
    assert lc.metric_sum(page, "vllm:ampd_retention_ttl_seconds") == pd_cluster.extra_config["retention_ttl_s"]


@pytest.fixture(scope="module")
def unauthenticated(pd_cluster, tmp_path_factory):
    """One more ampd worker, started without any cluster secret (single-host mode)."""
    log_dir = tmp_path_factory.mktemp("unauth")
    extra = {k: v for k, v in pd_cluster.extra_config.items() if k != "peers"}
    srv = lc.start_vllm(pd_cluster.model, name="unauthenticated", cpu=1, ampd=extra, log_dir=log_dir,
                        max_model_len=4096, kv_cache_gib=1, env={SECRET_ENV: "", SECRET_FILE_ENV: ""})
    try:
        lc.wait_healthy([srv], timeout_s=420)
        yield srv
    finally:
        lc.stop_all([srv])


def test_without_a_secret_the_connector_works_on_one_host_and_says_so(pd, unauthenticated, tokens):
    """The unauthenticated worker reads a prefill's KV from P over Mooncake (it checks no signature: it has
    no secret) and decodes the plain engine's tokens; the workers holding the secret refuse its unsigned
    descriptor and compute the request themselves."""
    u = unauthenticated.url
    assert "ampd connector: UNAUTHENTICATED" in Path(unauthenticated.log_path).read_text()
    prompt = tokens(400, "unauthenticated")
    ref = pd.reference(prompt, MAX_TOKENS)
    p_kv = lc.completion(pd.c.prefill.url, prompt, max_tokens=1,
                         kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    ans = lc.completion(u, prompt, max_tokens=MAX_TOKENS, kv_transfer_params=W.decode_params(p_kv))
    stats = W.response_stats(ans["kv_transfer_params"])
    assert W.response_error(ans["kv_transfer_params"]) is None and stats.get("read_blocks", 0) >= 3
    assert lc.output_ids(ans) == ref
    u_kv = lc.completion(u, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    src = W.response_source(u_kv)
    assert src is not None and src.sig is None  # nothing to sign with
    refused0 = pd.counter(pd.c.decode.url, "descriptors_refused")
    ans = lc.completion(pd.c.decode.url, prompt, max_tokens=MAX_TOKENS, kv_transfer_params=W.decode_params(u_kv))
    assert "unsigned" in (W.response_error(ans["kv_transfer_params"]) or "")
    assert lc.output_ids(ans) == ref
    lc.completion(pd.c.decode.url, tokens(20, "unauth-step"), max_tokens=1)  # counters are flushed per step
    time.sleep(0.5)
    assert pd.counter(pd.c.decode.url, "descriptors_refused") - refused0 >= 1
