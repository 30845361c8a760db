"""Unauthenticated single-host mode: an `ampd` worker started without a cluster secret says so at
start-up, still moves KV (here: a remote prefill read back from itself through Mooncake) with the right
tokens, and still refuses history URLs that are not on this host."""

from __future__ import annotations

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W

pytestmark = pytest.mark.integration

N_OUT = 8


@pytest.fixture(scope="module")
def open_worker(pd_cluster, tmp_path_factory):
    """One ampd worker without AMPD_CLUSTER_SECRET / AMPD_CLUSTER_SECRET_FILE (no `peers` either)."""
    srv = lc.start_vllm(pd_cluster.model, name="open", cpu=1, log_dir=tmp_path_factory.mktemp("open"),
                        ampd=pd_cluster.extra_config, max_model_len=4096, kv_cache_gib=1,
                        env={"AMPD_CLUSTER_SECRET": "", "AMPD_CLUSTER_SECRET_FILE": ""})
    try:
        lc.wait_healthy([srv], timeout_s=420)
        yield srv
    finally:
        srv.stop()


def test_unauthenticated_worker_warns_and_still_transfers(open_worker, pd_cluster, tokens):
    assert "UNAUTHENTICATED" in open_worker.log_path.read_text()
    prompt = tokens(300, "open-self-read")
    p_kv = lc.completion(open_worker.url, prompt, max_tokens=1,
                         kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    assert W.response_source(p_kv).sig is None  # nothing to sign with
    ans = lc.completion(open_worker.url, prompt, max_tokens=N_OUT, kv_transfer_params=W.decode_params(p_kv))
    kv = ans["kv_transfer_params"]
    assert W.response_error(kv) is None, W.response_error(kv)
    assert W.response_stats(kv)["read_blocks"] == 1  # the partial last block, read through Mooncake
    ref = lc.output_ids(lc.completion(pd_cluster.plain.url, prompt, max_tokens=N_OUT))
    assert lc.output_ids(ans) == ref


def test_unauthenticated_worker_still_refuses_foreign_history_urls(open_worker, tokens):
    prompt = tokens(500, "open-ssrf")
    p_kv = lc.completion(open_worker.url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
        history_from="http://192.0.2.7:8000", history_tokens=300))["kv_transfer_params"]
    assert "not on this host" in (W.response_error(p_kv) or "")
