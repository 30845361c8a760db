"""The "vLLM today" baseline for real: vLLM's in-tree MooncakeConnector (with the CPU patch) behind the
real `vllm-router` in PD mode. A 3-round conversation through the router gives exactly the plain
instance's greedy tokens, every round is prefilled on the prefill worker, and the decode worker takes the
prompt's KV from it over Mooncake (negative control: the decode worker computes next to nothing itself).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest

from ampd_plugin import localcluster as lc

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("vllm-router") is None, reason="needs ampd-plugin[baselines]")]

ROUNDS, MAX_TOKENS = 3, 12


@pytest.fixture(scope="module")
def vllm_today(tiny_model, engine_lock):
    from ampd_plugin.baselines_deploy import start_vllm_today

    log_dir = Path(tempfile.mkdtemp(prefix="ampd-vllm-today-"))
    dep = start_vllm_today(tiny_model, log_dir)
    plain = lc.start_vllm(tiny_model, name="plain", cpu=0, log_dir=log_dir, max_model_len=4096, kv_cache_gib=1)
    try:
        lc.wait_healthy([plain], timeout_s=420)
        yield dep, plain
    finally:
        plain.stop()
        dep.stop()


def sources(url: str) -> dict[str, float]:
    m = lc.scrape_metrics(url)
    return {s: lc.metric_sum(m, "vllm:prompt_tokens_by_source_total", source=s)
            for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}


def test_three_rounds_through_vllm_router_equal_the_plain_instance(vllm_today):
    dep, plain = vllm_today
    served = json.loads(urllib.request.urlopen(plain.url + "/v1/models", timeout=10).read())["data"][0]["id"]
    prompt = list(range(100, 100 + 700))
    p_before, d_before = sources(dep.prefill.url), sources(dep.decode.url)
    for k in range(ROUNDS):
        ref = lc.completion(plain.url, prompt, max_tokens=MAX_TOKENS, model=served)
        got = lc.completion(dep.url, prompt, max_tokens=MAX_TOKENS, model=served)
        assert got["choices"][0]["text"] == ref["choices"][0]["text"], f"round {k}"
        prompt = prompt + lc.output_ids(ref) + list(range(2000 + 150 * k, 2000 + 150 * k + 150))
    p_after, d_after = sources(dep.prefill.url), sources(dep.decode.url)
    p_prompt = sum(p_after.values()) - sum(p_before.values())
    d_ext = d_after["external_kv_transfer"] - d_before["external_kv_transfer"]
    d_computed = d_after["local_compute"] - d_before["local_compute"]
    # every round went to the prefill worker (it saw all three prompts)…
    assert p_prompt >= 700 + 862 + 1024, (p_before, p_after)
    # …and the decode worker got the KV it lacked from it instead of computing it
    assert d_ext > 0 and d_computed <= ROUNDS, (d_before, d_after)
