"""KV-plane safety with real workers: leases outlive a reader's wait (and a lapsed one is never read),
forged descriptors, foreign history URLs, replayed/unsigned notices and unauthenticated exports are
refused with a correct answer, a recompute on the holder is reported, and nothing is left pinned."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W
from ampd_plugin.connector.auth import ClusterAuth, load_secret

pytestmark = pytest.mark.integration

N_OUT = 8


def _post(url: str, path: str) -> None:
    req = urllib.request.Request(url + path, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200, resp.read()


def pause(url: str) -> None:
    """Freeze the engine's scheduler with its queue kept (vLLM dev mode), caches untouched."""
    _post(url, "/pause?mode=keep&clear_cache=false")


def resume(url: str) -> None:
    _post(url, "/resume")


def keep_busy(url: str, seconds: float, tokens) -> int:
    """Send small requests for ``seconds`` so the engine steps (a holder drains notices and expires leases
    only when it steps); return how many were served."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        lc.completion(url, tokens(40, f"busy-{n}-{end}"), max_tokens=2)
        n += 1
    return n


def test_lease_renewals_keep_the_history_for_a_reader_paused_past_the_ttl(pd, pd_cluster, tokens):
    """D migrates a session from P but is paused for 1.5× P's lease after P exported the history, while P
    keeps stepping: D's renewals keep the blocks pinned; D reads them and decodes the plain engine's tokens."""
    bs = pd_cluster.block_size
    p_url, d_url = pd.c.prefill.url, pd.c.decode.url
    r1 = tokens(650, "lease-r1")
    out1 = lc.output_ids(lc.completion(p_url, r1, max_tokens=N_OUT, kv_transfer_params=W.local_params()))
    r2 = r1 + out1 + tokens(100, "lease-r2")
    history = len(r1) + len(out1)
    ref = pd.reference(r2, N_OUT)
    renewed0, expired0 = pd.counter(p_url, "lease_renewals_received"), pd.counter(p_url, "lease_expiries")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pause(p_url)  # P queues D's export request until resumed
        try:
            fut = pool.submit(lc.completion, d_url, r2, max_tokens=N_OUT, timeout_s=120,
                              kv_transfer_params=W.migrate_params(history_from=p_url, history_tokens=history))
            time.sleep(2.0)  # D has asked P for the export
            pause(d_url)
        finally:
            resume(p_url)
        try:
            keep_busy(p_url, 1.5 * pd.c.lease_s, tokens)  # P exports, then keeps checking its leases
        finally:
            resume(d_url)
        ans = fut.result(timeout=120)
    kv = ans["kv_transfer_params"]
    stats = W.response_stats(kv)
    assert W.response_error(kv) is None, W.response_error(kv)
    assert stats["read_blocks"] == (history - 1) // bs
    assert stats["lease_renewals"] >= 3, stats  # D renewed while paused
    assert lc.output_ids(ans) == ref
    keep_busy(p_url, 0.5, tokens)  # let P's counters reach /metrics
    assert pd.counter(p_url, "lease_renewals_received") - renewed0 >= 3
    assert pd.counter(p_url, "lease_expiries") == expired0  # the lease, not luck, kept the blocks


def test_a_lapsed_lease_is_never_read(pd, tokens):
    """Negative control: the same wait, but D's renewals cannot reach P (the descriptor, re-signed as a
    trusted peer would send it, names a notify port nobody listens on): P's lease lapses and P frees the
    blocks (its expiry counter says so); D abandons the read and computes the prompt itself — the right
    tokens, and an error naming the lease."""
    p_url, d_url = pd.c.prefill.url, pd.c.decode.url
    prompt = tokens(500, "lapsed")
    ref = pd.reference(prompt, N_OUT)
    expired0, abandoned0 = pd.counter(p_url, "lease_expiries"), pd.counter(d_url, "lease_abandoned_reads")
    p_kv = lc.completion(p_url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    src = W.response_source(p_kv)
    deaf = pd.sign(W.SourceDescriptor(**{**src.__dict__, "notify": f"tcp://127.0.0.1:{lc.free_port()}"}))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pause(d_url)
        try:
            fut = pool.submit(lc.completion, d_url, prompt, max_tokens=N_OUT, timeout_s=120,
                              kv_transfer_params={"ampd": {"role": "decode", "xfer": src.xfer,
                                                           "source": deaf.to_dict()}})
            keep_busy(p_url, 1.5 * pd.c.lease_s, tokens)
        finally:
            resume(d_url)
        ans = fut.result(timeout=120)
    err = W.response_error(ans["kv_transfer_params"]) or ""
    assert "lease" in err, err
    assert "read_blocks" not in W.response_stats(ans["kv_transfer_params"])
    assert lc.output_ids(ans) == ref
    keep_busy(p_url, 0.5, tokens)
    assert pd.counter(p_url, "lease_expiries") - expired0 >= 1
    assert pd.counter(d_url, "lease_abandoned_reads") - abandoned0 >= 1


def _prefill(pd, prompt):
    return lc.completion(pd.c.prefill.url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())[
        "kv_transfer_params"]


@pytest.mark.parametrize("forgery", ["unsigned", "altered", "self-signed"])
def test_forged_descriptors_are_refused(pd, tokens, forgery):
    prompt = tokens(400, f"forged-{forgery}")
    src = W.response_source(_prefill(pd, prompt)).to_dict()
    if forgery == "unsigned":
        src.pop("sig")
    elif forgery == "altered":
        src["blocks"] = [b + 1 for b in src["blocks"]]  # someone else's blocks, same signature
    else:
        src = ClusterAuth(b"not-the-cluster-secret-0123456789").sign_source(W.SourceDescriptor.from_dict(src)).to_dict()
    refused0 = pd.counter(pd.c.decode.url, "descriptors_refused")
    ans = lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT,
                        kv_transfer_params={"ampd": {"role": "decode", "xfer": src["xfer"], "source": src}})
    err = W.response_error(ans["kv_transfer_params"]) or ""
    assert ("unsigned" if forgery == "unsigned" else "signature is invalid") in err, err
    assert "read_blocks" not in W.response_stats(ans["kv_transfer_params"])
    assert lc.output_ids(ans) == pd.reference(prompt, N_OUT)
    assert pd.counter(pd.c.decode.url, "descriptors_refused") - refused0 == 1
    assert lc.is_healthy(pd.c.decode.url)


@pytest.mark.parametrize("url", ["http://192.0.2.7:8000", "http://127.0.0.1:1"])
def test_history_from_a_stranger_is_never_fetched(pd, tokens, url):
    """SSRF: a foreign host, and a port on this host that is not a listed peer — refused before any
    connection, the prompt computed by P, the right tokens through D."""
    prompt = tokens(600, f"ssrf-{url}")
    lc.reset_prefix_cache(pd.c.prefill.url)
    t0 = time.monotonic()
    p_kv = lc.completion(pd.c.prefill.url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
        history_from=url, history_tokens=400))["kv_transfer_params"]
    assert time.monotonic() - t0 < 5
    err = W.response_error(p_kv) or ""
    assert "refused" in err and "not a known peer" in err, err
    assert "history_export_ms" not in W.response_stats(p_kv)
    out = lc.output_ids(lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT,
                                      kv_transfer_params=W.decode_params(p_kv)))
    assert out == pd.reference(prompt, N_OUT)


def _push(addr: str, payload: bytes) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(addr)
    sock.send(payload)
    sock.close()


def test_unsigned_forged_and_replayed_notices_are_refused(pd, tokens):
    """Notices straight to P's notify socket: unsigned (the old wire), forged and replayed "done" notices
    are refused and counted; the pin stays until the reader's own notice, and D still reads correctly."""
    p_url = pd.c.prefill.url
    prompt = tokens(400, "notices")
    p_kv = _prefill(pd, prompt)
    src = W.response_source(p_kv)
    auth = ClusterAuth(load_secret())
    refused0 = pd.counter(p_url, "notices_refused")
    valid = auth.notice("done", "xfer-someone-else")  # a genuine notice for another transfer...
    _push(src.notify, json.dumps({"xfer": src.xfer}).encode())                      # unsigned
    forged = json.loads(auth.notice("done", src.xfer))
    forged["mac"] = "0" * 64
    _push(src.notify, json.dumps(forged).encode())                                  # forged
    _push(src.notify, valid)
    _push(src.notify, valid)                                                         # ...replayed
    keep_busy(p_url, 0.5, tokens)  # P drains its notices
    ans = lc.completion(pd.c.decode.url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    assert W.response_error(ans["kv_transfer_params"]) is None
    assert W.response_stats(ans["kv_transfer_params"])["read_blocks"] >= 1
    assert lc.output_ids(ans) == pd.reference(prompt, N_OUT)
    keep_busy(p_url, 0.5, tokens)
    assert pd.counter(p_url, "notices_refused") - refused0 == 3
    assert lc.is_healthy(p_url)


def test_export_hands_no_addresses_to_an_unauthenticated_caller(pd, tokens):
    """A direct `export` request (what a history read sends) without the cluster-secret token gets an error
    and no descriptor — no Mooncake address, block id or base address — and nothing is pinned."""
    d_url = pd.c.decode.url
    prompt = tokens(300, "export-stranger")
    lc.completion(d_url, prompt, max_tokens=1)
    refused0 = pd.counter(d_url, "exports_refused")
    for i in range(5):
        ans = lc.completion(d_url, prompt, max_tokens=1, kv_transfer_params=W.export_params(f"xfer-stranger-{i}"))
        kv = ans["kv_transfer_params"]
        assert "export refused" in (W.response_error(kv) or "")
        assert "source" not in kv["ampd"] and "held_blocks" not in W.response_stats(kv)
        assert W.response_stats(kv)["tables"]["source_holds"] == 0
    stolen = ClusterAuth(load_secret()).export_token("xfer-once", prompt + [5])
    lc.completion(d_url, prompt + [5], max_tokens=1, kv_transfer_params=W.export_params("xfer-once", stolen))
    again = lc.completion(d_url, prompt + [5], max_tokens=1, kv_transfer_params=W.export_params("xfer-once", stolen))
    assert "replayed" in (W.response_error(again["kv_transfer_params"]) or "")  # a captured token works once
    lc.completion(d_url, prompt, max_tokens=1)
    assert pd.counter(d_url, "exports_refused") - refused0 == 6


def test_an_export_that_recomputes_on_the_holder_says_so(pd, tokens):
    """The history was evicted from D: the export recomputes it on D; P's response and D's counters say so."""
    d_url = pd.c.decode.url
    r1 = tokens(700, "recompute-r1")
    out1, _ = pd.local(r1, N_OUT, session="recompute", retain=False)
    assert lc.reset_prefix_cache(d_url) and lc.reset_prefix_cache(pd.c.prefill.url)
    r2 = r1 + out1 + tokens(150, "recompute-r2")
    before = pd.counter(d_url, "export_recomputed_tokens")
    out2, p_kv, _ = pd.remote(r2, N_OUT, session="recompute", history_tokens=len(r1) + len(out1))
    assert out2 == pd.reference(r2, N_OUT)
    recomputed = W.response_stats(p_kv)["history_recomputed_tokens"]
    assert recomputed >= 5 * pd.c.block_size  # the whole history minus at most its last token
    lc.completion(d_url, tokens(20, "recompute-step"), max_tokens=1)
    assert pd.counter(d_url, "export_recomputed_tokens") - before == recomputed


def test_nothing_stays_pinned_or_tracked_after_failing_rounds(pd, tokens):
    """Many rounds mixing successes and every refusal above; afterwards (one lease later) no export pin,
    no tracked lease and no request state is left on either worker."""
    p_url, d_url = pd.c.prefill.url, pd.c.decode.url
    for i in range(6):
        prompt = tokens(300, f"leak-{i}")
        p_kv = _prefill(pd, prompt)
        if i % 3 == 1:  # a forged descriptor: D refuses, P's pin must still go (by its lease)
            p_kv["ampd"]["source"]["blocks"] = list(reversed(p_kv["ampd"]["source"]["blocks"]))
        if i % 3 == 2:  # an unauthenticated export and a stranger's history URL
            lc.completion(d_url, prompt, max_tokens=1, kv_transfer_params=W.export_params(f"leak-x{i}"))
            lc.completion(p_url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
                history_from="http://192.0.2.7:1", history_tokens=200))
        out = lc.output_ids(lc.completion(d_url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv)))
        assert out == pd.reference(prompt, N_OUT)
    time.sleep(pd.c.lease_s + 1)
    for url in (p_url, d_url):
        tables = W.response_stats(lc.completion(url, tokens(20, "leak-probe"), max_tokens=1,
                                                kv_transfer_params=W.local_params())["kv_transfer_params"])["tables"]
        assert tables["source_holds"] == 0 and tables["leases"] == 0 and tables["pending_loads"] == 0, tables
        assert tables["requests"] == 0, tables  # the probe itself was popped before the snapshot
