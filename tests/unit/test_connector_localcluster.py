"""localcluster's pure helpers: launch commands, ports, netns detection, metric parsing."""

import json

from ampd_plugin import localcluster as lc


def test_vllm_launch_with_ampd_connector():
    env, argv = lc.vllm_launch("/m", 8010, cpu=1, ampd={"protocol": "tcp", "retention_ttl_s": 5})
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    cfg = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert cfg["kv_connector"] == "ampd" and cfg["kv_load_failure_policy"] == "recompute"
    assert cfg["kv_connector_extra_config"] == {"protocol": "tcp", "retention_ttl_s": 5}
    assert argv[argv.index("--port") + 1] == "8010"
    line = lc.format_launch(env, argv)
    assert "VLLM_HOST_IP=127.0.0.1" in line and "'{\"kv_connector\"" in line


def test_plain_launch_has_no_connector():
    _, argv = lc.vllm_launch("/m", 1234, cpu=None)
    assert "--kv-transfer-config" not in argv


def test_free_ports_are_distinct():
    ports = lc.free_ports(5)
    assert len(set(ports)) == 5 and all(0 < p < 65536 for p in ports)


def test_in_isolated_netns_matches_interfaces(monkeypatch):
    monkeypatch.setattr(lc, "_interfaces_up", lambda: ["lo"])
    assert lc.in_isolated_netns()
    monkeypatch.setattr(lc, "_interfaces_up", lambda: ["eth0", "lo"])
    assert not lc.in_isolated_netns()
    monkeypatch.delenv(lc.ALLOW_HOST_NETWORK_ENV, raising=False)
    try:
        lc.require_isolated_netns("x")
    except RuntimeError as exc:
        assert "ip netns" in str(exc) and lc.ALLOW_HOST_NETWORK_ENV in str(exc)
    else:
        raise AssertionError("should refuse")
    monkeypatch.setenv(lc.ALLOW_HOST_NETWORK_ENV, "1")
    lc.require_isolated_netns("x")


def test_metric_sum_filters_labels():
    m = {'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"}': 5.0,
         'vllm:prompt_tokens_by_source_total{engine="0",source="local_cache_hit"}': 7.0,
         'vllm:other{source="local_compute"}': 100.0}
    assert lc.metric_sum(m, "vllm:prompt_tokens_by_source_total", source="local_compute") == 5.0
    assert lc.metric_sum(m, "vllm:prompt_tokens_by_source_total") == 12.0
