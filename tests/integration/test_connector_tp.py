"""The ampd connector across tensor-parallel layouts, with real vLLM-CPU engines (one process per TP rank).

Engines (float32, the tiny model with 2 KV heads; started once for this module, stopped after it):
``tp2a`` and ``tp2b`` (TP 2: one KV head per rank), ``tp1`` (TP 1) with the connector, and ``plain`` (TP 1,
no connector) as the greedy reference. Pairs: P TP2 → D TP1, P TP1 → D TP2, P TP2 → D TP2. Every answer
must equal the plain TP-1 instance's; the negative control shows D really decodes from the moved KV.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W
from ampd_plugin.tiny_model import PRESETS

from test_router_real import RouterProc, converse  # noqa: E402 - tests/integration is on sys.path (rootdir mode)

# Opt-in (AMPD_TEST_TP=1): a history export that involves a TP-2 engine can stall for the whole HTTP timeout
# (P TP2 -> D TP2 fails, other pairs intermittently), and the module's four extra engines next to the session's
# two are not yet within the suite's time budget. docs/connector.md records the status.
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.environ.get("AMPD_TEST_TP") != "1",
                                 reason="TP real-engine tests are opt-in (AMPD_TEST_TP=1) until history exports "
                                        "with a TP-2 engine stop stalling")]

N_OUT = 12
PAIRS = [("tp2a", "tp1"), ("tp1", "tp2a"), ("tp2a", "tp2b")]
KV_BYTES_PER_TOKEN = PRESETS["tiny"].kv_bytes_per_token(dtype_bytes=4)


@pytest.fixture(scope="module")
def tp(tiny_model, engine_lock, cluster_secret, engine_starter):
    lc.require_isolated_netns("the TP integration engines (ampd connector / Mooncake)")
    log_dir = Path(os.environ.get("AMPD_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="ampd-tp-")) / "tp"
    specs = {"tp2a": {"tp": 2, "ampd": True}, "tp2b": {"tp": 2, "ampd": True}, "tp1": {"ampd": True},
             "plain": {}}
    # Generous deadlines: four engines share two cores, and so may other jobs (a history export recomputing a
    # few hundred tokens took >5 s on a loaded run); bounded all the same.
    servers = engine_starter(tiny_model, specs, log_dir, ampd_extra={
        "transfer_timeout_s": 15, "hold_ttl_s": 40, "http_timeout_s": 40, "max_history_wait_s": 90})
    try:
        yield servers
    finally:
        lc.stop_all(servers.values())


def _ref(tp, prompt):
    return lc.output_ids(lc.completion(tp["plain"].url, prompt, max_tokens=N_OUT))


def _remote(tp, p, d, prompt, *, session=None, history_tokens=0):
    p_params = W.remote_prefill_params(session=session, history_from=tp[d].url if history_tokens else None,
                                       history_tokens=history_tokens)
    p_kv = lc.completion(tp[p].url, prompt, max_tokens=1, kv_transfer_params=p_params)["kv_transfer_params"]
    d_ans = lc.completion(tp[d].url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv, session=session))
    return lc.output_ids(d_ans), p_kv, d_ans["kv_transfer_params"]


def _check_read(stats, src_tp, reader_tp):
    assert stats["read_blocks"] >= 1, stats
    assert stats["source_tp"] == src_tp and stats["read_ranks"] == reader_tp, stats
    # every reader rank read its own heads: all KV heads of every read block arrived, whatever the layouts
    assert stats["read_bytes"] == stats["read_blocks"] * 128 * KV_BYTES_PER_TOKEN, stats


@pytest.mark.parametrize("p,d", PAIRS)
def test_remote_local_and_history_rounds_across_tp(tp, tokens, p, d):
    """Round 1 remote prefill (D reads P), round 2 local on D, round 3 remote incremental (P reads the history
    from D, D reads the increment from P): both directions of every pair, greedy-equal to plain TP 1."""
    tp_of = {"tp2a": 2, "tp2b": 2, "tp1": 1}
    session = f"tp-{p}-{d}"
    prompt = tokens(400, f"tp-flows-{p}-{d}")
    history = 0
    for rnd, flow in enumerate(["a", "b", "c"], 1):
        ref = _ref(tp, prompt)
        if flow == "b":
            ans = lc.completion(tp[d].url, prompt, max_tokens=N_OUT, kv_transfer_params=W.local_params(session=session))
            out, d_kv = lc.output_ids(ans), ans["kv_transfer_params"]
        else:
            out, p_kv, d_kv = _remote(tp, p, d, prompt, session=session, history_tokens=history)
            assert W.response_error(p_kv) is None, W.response_error(p_kv)
            if flow == "c":
                _check_read(W.response_stats(p_kv), tp_of[d], tp_of[p])  # P read D's history
            else:
                _check_read(W.response_stats(d_kv), tp_of[p], tp_of[d])
        assert W.response_error(d_kv) is None, W.response_error(d_kv)
        assert out == ref, f"round {rnd} (flow {flow}) P={p} D={d} differs from plain TP 1"
        history = len(prompt) + len(out)
        prompt = prompt + out + tokens(150, f"tp-flows-{p}-{d}-{rnd}")


@pytest.mark.parametrize("old,new", [("tp1", "tp2a"), ("tp2a", "tp1")])
def test_migration_across_tp(tp, tokens, old, new):
    """A session served by one worker moves to a worker with another TP: it reads the history, computes the rest."""
    r1 = tokens(500, f"tp-migrate-{old}")
    out1 = lc.output_ids(lc.completion(tp[old].url, r1, max_tokens=N_OUT,
                                       kv_transfer_params=W.local_params(session=f"mig-{old}")))
    assert out1 == _ref(tp, r1)
    r2 = r1 + out1 + tokens(80, f"tp-migrate-{old}-2")
    history = len(r1) + len(out1)
    ans = lc.completion(tp[new].url, r2, max_tokens=N_OUT, kv_transfer_params=W.migrate_params(
        history_from=tp[old].url, history_tokens=history, session=f"mig-{old}"))
    kv = ans["kv_transfer_params"]
    assert W.response_error(kv) is None, W.response_error(kv)
    stats = W.response_stats(kv)
    assert stats["read_blocks"] == (history - 1) // 128
    _check_read(stats, 2 if old.startswith("tp2") else 1, 2 if new.startswith("tp2") else 1)
    assert lc.output_ids(ans) == _ref(tp, r2)


@pytest.mark.parametrize("p,d", PAIRS[:2])
def test_negative_control_decode_uses_kv_moved_across_tp(tp, tokens, p, d):
    """D is asked for A' but handed P's KV of A (fingerprint stripped, re-signed): it continues A — the
    heads it decodes from came over the wire from the other TP layout (with the transfer off it gives A')."""
    from ampd_plugin.connector.auth import ClusterAuth, load_secret

    a = tokens(300, f"tp-negative-{p}")
    a_prime = [a[0] + 1] + a[1:]
    ref_a, ref_a_prime = _ref(tp, a), _ref(tp, a_prime)
    assert ref_a != ref_a_prime, "the tiny model must be context sensitive for this control to mean anything"
    local = lc.output_ids(lc.completion(tp[d].url, a_prime, max_tokens=N_OUT))
    assert local == ref_a_prime  # transfer disabled: D computes A' itself
    assert lc.reset_prefix_cache(tp[d].url)  # else D's own cache of A' would leave nothing to read
    p_kv = lc.completion(tp[p].url, a, max_tokens=1, kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    src = W.response_source(p_kv)
    p_kv["ampd"]["source"] = ClusterAuth(load_secret()).sign_source(
        W.SourceDescriptor(**{**src.__dict__, "fingerprint": None})).to_dict()
    out = lc.output_ids(lc.completion(tp[d].url, a_prime, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv)))
    assert out == ref_a and out != local
    lc.reset_prefix_cache(tp[d].url)  # D's cache now maps A' to A's KV: drop it


def test_unmappable_source_is_computed_locally(tp, tokens):
    """A TP-2 holder's descriptor without its head layout cannot be split for a TP-1 reader: the reader says so
    and computes the prompt itself (still the right answer); a tampered layout fails the signature."""
    from ampd_plugin.connector.auth import ClusterAuth, load_secret

    auth = ClusterAuth(load_secret())
    prompt = tokens(300, "tp-unmappable")
    p_kv = lc.completion(tp["tp2a"].url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    src = W.response_source(p_kv)
    assert src.tp == 2 and src.kv_heads == 2 and len(src.ranks) == 1 and src.ranks[0][0] != src.te
    stripped = W.SourceDescriptor(**{**src.__dict__, "kv_heads": None, "head_bytes": None, "sig": None})
    p_kv["ampd"]["source"] = auth.sign_source(stripped).to_dict()
    ans = lc.completion(tp["tp1"].url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    assert "describes no KV-head layout" in (W.response_error(ans["kv_transfer_params"]) or "")
    assert lc.output_ids(ans) == _ref(tp, prompt)
    forged = {**src.to_dict(), "head_bytes": src.head_bytes * 2, "block_bytes": src.block_bytes * 2}
    p_kv["ampd"]["source"] = forged  # keeps the old signature
    ans = lc.completion(tp["tp1"].url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    assert "signature" in (W.response_error(ans["kv_transfer_params"]) or "")
    assert lc.output_ids(ans) == _ref(tp, prompt)


@pytest.mark.parametrize("p,d", PAIRS)
def test_router_conversation_across_tp(tp, tiny_model, tmp_path, p, d):
    """Through the router: the AMPD policy (remote, then local rounds) and forced-remote rounds whose history
    spans whole blocks (P reads it from D), three rounds each, text equal to the plain TP-1 instance."""
    ampd = RouterProc([tp[p].url], [tp[d].url], "ampd", tiny_model, tmp_path, "--ttft-slo", "0.001", "--itl-slo", "30")
    remote = RouterProc([tp[p].url], [tp[d].url], "disagg", tiny_model, tmp_path)
    try:
        kinds = [r for r, _ in converse(ampd.url, tp["plain"].url, f"router-{p}-{d}",
                                        f"TP session {p} to {d}: plan a trip through three cities.")]
        assert kinds[0] == "remote" and "local" in kinds, kinds
        opening = f"Inventory {p}/{d}: " + " ".join(f"item{i} costs {i * 13 % 97} units;" for i in range(120))
        kinds = [r for r, _ in converse(remote.url, tp["plain"].url, f"router-long-{p}-{d}", opening)]
        assert set(kinds) == {"remote"}
        moved = [line for line in remote.metrics().splitlines()
                 if line.startswith('ampd_router_kv_bytes_moved_total{kind="history_read"}')]
        assert moved and float(moved[0].split()[-1]) > 0, moved
    finally:
        ampd.stop()
        remote.stop()
