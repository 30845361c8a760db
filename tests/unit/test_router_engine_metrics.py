"""Engine signals from a worker's /metrics page (vLLM 0.32 and SGLang names) onto its WorkerState."""

from ampd_plugin.router.engine_metrics import EngineSignals, parse
from ampd_plugin.router_policy.state import ClusterState, WorkerState

VLLM = '''# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} %s
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} %s
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="64",kv_cache_size_tokens="None"} 1.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1"} 1.0
'''


def test_vllm_page_is_read_and_the_capacity_comes_from_the_engine():
    s = parse(VLLM % (100, 40))
    assert (s.running, s.waiting, s.kv_usage, s.kv_capacity_tokens) == (3, 2, 0.25, 64 * 128)
    c = ClusterState()
    d = c.add_worker(WorkerState("decode-0", "decode", kv_capacity_tokens=65536))
    sig = EngineSignals(c, fixed_capacity=None)
    sig.apply("decode-0", VLLM % (100, 40))
    assert d.kv_capacity_tokens == 8192 and d.engine_kv_usage == 0.25
    assert d.kv_used_estimate == 2048 and d.kv_free_tokens == 8192 - 2048  # the engine's view, not the ledger's
    sig.apply("decode-0", VLLM % (200, 100))
    assert d.engine_prefix_hit_rate == 0.6  # (100 - 40) / (200 - 100) since the previous poll
    sig.apply("decode-0", None)  # unreachable page: unknown again, capacity kept
    assert d.engine_kv_usage is None and d.kv_capacity_tokens == 8192


def test_an_operator_capacity_wins_and_sglang_names_are_read():
    c = ClusterState()
    d = c.add_worker(WorkerState("decode-0", "decode", kv_capacity_tokens=1000))
    EngineSignals(c, fixed_capacity=1000).apply("decode-0", VLLM % (1, 1))
    assert d.kv_capacity_tokens == 1000
    s = parse("sglang:num_running_reqs 4\nsglang:num_queue_reqs 1\nsglang:token_usage 0.5\n"
              "sglang:cache_hit_rate 0.3\nsglang:max_total_num_tokens 20000\n")
    assert (s.running, s.waiting, s.kv_usage, s.prefix_hit_rate, s.kv_capacity_tokens) == (4, 1, 0.5, 0.3, 20000)
    assert parse("not a metrics page {{{").running is None
