"""Failure handling of the ampd connector with real workers: a dead peer, a peer that never answers, a bad
address and malformed params each end in a recompute or a clear error within the deadline; the engines keep
serving and their caches stay correct."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W

pytestmark = pytest.mark.integration

N_OUT = 8


@contextlib.contextmanager
def silent_listener(port: int = 0):
    """A TCP port that accepts connections and never says a word (a hung peer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _prefill_source(pd, prompt):
    ans = lc.completion(pd.c.prefill.url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())
    return W.response_source(ans["kv_transfer_params"])


def _decode_from(pd, prompt, source):
    params = {"ampd": {"role": "decode", "xfer": source.xfer, "source": source.to_dict()}}
    t0 = time.monotonic()
    ans = lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT, kv_transfer_params=params)
    return lc.output_ids(ans), ans.get("kv_transfer_params"), time.monotonic() - t0


@pytest.mark.parametrize("te", ["127.0.0.1:1", "no-such-host.invalid:4000"])
def test_dead_or_bad_peer_is_recomputed(pd, tokens, te):
    prompt = tokens(300, f"dead-peer-{te}")
    source = _prefill_source(pd, prompt)
    broken = pd.sign(W.SourceDescriptor(**{**source.__dict__, "te": te}))  # a trusted peer, wrong address
    out, kv, secs = _decode_from(pd, prompt, broken)
    assert out == pd.reference(prompt, N_OUT)
    assert "failed" in (W.response_error(kv) or "")
    assert secs < 20


def test_hung_peer_times_out_and_is_recomputed(pd, tokens):
    prompt = tokens(300, "hung-peer")
    source = _prefill_source(pd, prompt)
    with silent_listener() as port:
        hung = pd.sign(W.SourceDescriptor(**{**source.__dict__, "te": f"127.0.0.1:{port}"}))
        out, kv, secs = _decode_from(pd, prompt, hung)
    assert out == pd.reference(prompt, N_OUT)
    assert W.response_error(kv)
    # bounded by Mooncake's own handshake deadline (~60 s): the read is never abandoned early, so no late
    # bytes can land in blocks vLLM has already reused for the recompute
    assert secs < 90


def test_unreachable_or_hung_history_holder_means_local_compute(pd, tokens):
    prompt = tokens(700, "history-holder-gone")
    lc.reset_prefix_cache(pd.c.prefill.url)  # P must not cache the prompts, or no history export is attempted
    for history_from in ["http://127.0.0.1:1"]:
        p_kv = lc.completion(pd.c.prefill.url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
            history_from=history_from, history_tokens=500)).get("kv_transfer_params")
        assert "history export" in W.response_error(p_kv)
        out = lc.output_ids(lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT,
                                          kv_transfer_params=W.decode_params(p_kv)))
        assert out == pd.reference(prompt, N_OUT)
    with silent_listener(pd.c.spare_peer_port) as port:  # a listed peer that hangs
        t0 = time.monotonic()
        fresh = tokens(650, "history-holder-hung")  # P must not cache it, or no export is attempted
        p_kv = lc.completion(pd.c.prefill.url, fresh, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
            history_from=f"http://127.0.0.1:{port}", history_tokens=500)).get("kv_transfer_params")
        assert time.monotonic() - t0 < 30
        assert "history export" in W.response_error(p_kv)


@pytest.mark.parametrize("bad", [
    {"ampd": {"role": "decode"}},
    {"ampd": {"role": "prefill", "xfer": "x", "history": {"from": "not a url", "tokens": 5}}},
    {"ampd": "oops"},
    {"ampd": {"role": "decode", "source": {"te": "127.0.0.1:1"}}},
])
def test_malformed_params_give_a_clear_error_and_a_correct_answer(pd, tokens, bad):
    prompt = tokens(200, f"malformed-{bad}")
    ans = lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT, kv_transfer_params=bad)
    assert "malformed kv_transfer_params" in W.response_error(ans["kv_transfer_params"])
    assert lc.output_ids(ans) == pd.reference(prompt, N_OUT)
    assert lc.is_healthy(pd.c.decode.url)


def test_engines_still_serve_correctly_after_the_failures(pd, tokens):
    prompt = tokens(500, "after-failures")
    out, _, d_kv = pd.remote(prompt, N_OUT)
    assert W.response_error(d_kv) is None
    assert out == pd.reference(prompt, N_OUT)
