"""Router settings: YAML file, flag overrides, validation, and the `route` command's parsing."""

import pytest
from click.testing import CliRunner

from ampd_plugin.router import app as app_module
from ampd_plugin.router import cli
from ampd_plugin.router.config import RouterConfig


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "router.yaml"
    f.write_text("decode: [http://127.0.0.1:9]\npolicy: threshold\npolicy_params: {max_local_tokens: 64}\nttft_slo: 3\n")
    cfg = RouterConfig.from_yaml(f).updated({"ttft_slo": 1.5, "policy_params": {"window_s": 5}, "port": None})
    assert cfg.policy == "threshold" and cfg.ttft_slo == 1.5 and cfg.port == 8000
    assert cfg.policy_params == {"max_local_tokens": 64, "window_s": 5}


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    f = tmp_path / "router.yaml"
    f.write_text("decode: [http://x:1]\nttft_sla: 3\n")
    with pytest.raises(ValueError, match="ttft_sla"):
        RouterConfig.from_yaml(f)
    with pytest.raises(ValueError, match="decode"):
        RouterConfig().validate()
    with pytest.raises(ValueError, match="mooncake"):
        RouterConfig(decode=["http://x:1"], kv_connector="mooncake").validate()
    with pytest.raises(ValueError):
        RouterConfig(decode=["http://x:1"], balanced_pd_share=1.5).validate()


def test_redacted_hides_the_api_key():
    assert RouterConfig(api_key="k").redacted()["api_key"] == "***"


def test_route_command_parses_url_lists_and_params(monkeypatch):
    seen = {}

    def fake_make_router(cfg):
        seen["cfg"] = cfg
        raise ValueError("stop before serving")

    monkeypatch.setattr(app_module, "make_router", fake_make_router)
    result = CliRunner().invoke(cli.route, ["--prefill", "http://127.0.0.1:1", "http://127.0.0.1:2", "--decode",
                                            "http://127.0.0.1:3", "--param", "alpha=0.8", "--param", "reorder=false",
                                            "--ttft-slo", "1.5", "--api-key", "k"])
    assert result.exit_code == 2 and "stop before serving" in result.output
    cfg = seen["cfg"]
    assert cfg.prefill == ["http://127.0.0.1:1", "http://127.0.0.1:2"] and cfg.decode == ["http://127.0.0.1:3"]
    assert cfg.policy_params == {"alpha": 0.8, "reorder": False} and cfg.ttft_slo == 1.5 and cfg.host == "127.0.0.1"


def test_unknown_policy_is_a_usage_error():
    result = CliRunner().invoke(cli.route, ["--decode", "http://127.0.0.1:3", "--policy", "nope"])
    assert result.exit_code == 2 and "known policies" in result.output


def test_unknown_policy_param_is_a_usage_error():
    result = CliRunner().invoke(cli.route, ["--decode", "http://127.0.0.1:3", "--param", "alpah=1"])
    assert result.exit_code == 2 and "alpah" in result.output
