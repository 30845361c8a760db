"""SGLang launch flags, checked with SGLang 0.5.23's own argument parser after our plugin is loaded; the
start-up checks run as the real `ServerArgs.resolve_once` hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang", reason="needs .venv-sglang (scripts/test_sglang.sh)")

REPRESENTATIVE = (
    "python -m sglang.launch_server --model-path M --disaggregation-mode prefill "
    "--disaggregation-transfer-backend ampd --tp-size 2 --port 30000 --disaggregation-bootstrap-port 8998"
)


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def parse(argv):
    from sglang.srt.server_args import prepare_server_args

    if argv[:3] == ["python", "-m", "sglang.launch_server"]:
        argv = argv[3:]
    return prepare_server_args(list(argv))


def test_representative_command_parses():
    args = parse(REPRESENTATIVE.split())
    assert args.disaggregation_transfer_backend == "ampd"
    assert args.disaggregation_mode == "prefill"
    assert args.tp_size == 2 and args.port == 30000 and args.disaggregation_bootstrap_port == 8998


def test_planner_emitted_sglang_commands_parse():
    from ampd_plugin.connector.sglang.checks import problems
    from ampd_plugin.planner.emit import RouterOptions, build_deployment
    from ampd_plugin.planner.placement import Placement, Replica

    placement = Placement(nodes=1, gpus_per_node=4, replicas=[
        Replica("prefill", 2, 0, node=0, devices=(0, 1)),
        Replica("decode", 1, 0, node=0, devices=(2,)),
        Replica("decode", 1, 1, node=0, devices=(3,)),
    ])
    dep = build_deployment("t", placement, "sglang", "/models/M", RouterOptions(), max_model_len=4096)
    kinds = set()
    for worker in dep.workers:
        args = parse(worker.argv)
        kinds.add(args.disaggregation_mode)
        assert args.disaggregation_transfer_backend == "ampd"
        assert args.tp_size == worker.tp and args.port == worker.port
        if worker.kind == "prefill":
            assert args.disaggregation_bootstrap_port == worker.bootstrap_port
        else:
            assert args.disaggregation_decode_enable_radix_cache
        # The plugin's own start-up check (local prefill on) accepts what the planner emits.
        assert problems(vars(args), local_prefill=True, multi_tokenizer_ok=True) == []
    assert kinds == {"prefill", "decode"}


def test_ampd_is_only_valid_with_the_plugin():
    """Without our plugin (SGLANG_PLUGINS allow-list excludes it) SGLang's parser rejects the choice."""
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins()\n"
        "from sglang.srt.server_args import prepare_server_args\n"
        f"prepare_server_args({REPRESENTATIVE.split()[3:]!r})\n"
    )
    env = dict(os.environ, SGLANG_PLUGINS="not-ampd")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "invalid choice: 'ampd'" in out.stderr


def _resolve(tiny_model_dir, *extra, mode="decode"):
    argv = ["--model-path", tiny_model_dir, "--skip-tokenizer-init", "--device", "cpu",
            "--disaggregation-mode", mode, "--disaggregation-transfer-backend", "ampd", *extra]
    args = parse(argv)
    args.resolve_once()  # our check runs here, as an AFTER hook
    return args


def test_checks_accept_supported_decode(tiny_model_dir):
    args = _resolve(tiny_model_dir, "--disaggregation-decode-enable-radix-cache", "--disable-overlap-schedule")
    assert args.resolved_dict()["disaggregation_decode_enable_radix_cache"]
    _resolve(tiny_model_dir, mode="prefill")


def test_checks_refuse_unsupported_decode(tiny_model_dir):
    from ampd_plugin.connector.sglang.checks import UnsupportedConfiguration

    with pytest.raises(UnsupportedConfiguration) as err:
        _resolve(tiny_model_dir)
    text = str(err.value)
    assert "--disaggregation-decode-enable-radix-cache" in text and "--disable-overlap-schedule" in text
    assert "AMPD_SGLANG_LOCAL_PREFILL=0" in text


def test_local_prefill_can_be_turned_off(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AMPD_SGLANG_LOCAL_PREFILL", "0")
    _resolve(tiny_model_dir)  # a plain decode worker: no local-prefill requirements


def test_check_rules():
    from ampd_plugin.connector.sglang.checks import problems

    base = {"disaggregation_transfer_backend": "ampd", "disaggregation_mode": "decode",
            "disaggregation_decode_enable_radix_cache": True, "disable_overlap_schedule": True}
    assert problems(base, local_prefill=True, multi_tokenizer_ok=True) == []
    assert problems({**base, "disaggregation_transfer_backend": "mooncake", "pp_size": 4},
                    local_prefill=True, multi_tokenizer_ok=False) == []
    for change, needle in [
        ({"enable_dp_attention": True}, "data-parallel attention"),
        ({"attn_dp_size": 2}, "data-parallel attention"),
        ({"speculative_algorithm": "EAGLE"}, "speculative"),
        ({"enable_mixed_chunk": True}, "mixed-chunk"),
        ({"pp_size": 2}, "pipeline"),
        ({"tokenizer_worker_num": 2}, "tokenizer-worker-num"),
        ({"disaggregation_decode_allocation_policy": "prefill_complete"}, "allocation-policy"),
    ]:
        found = problems({**base, **change}, local_prefill=True, multi_tokenizer_ok=False)
        assert any(needle in p for p in found), (change, found)
    assert problems({**base, "tokenizer_worker_num": 2}, local_prefill=True, multi_tokenizer_ok=True) == []


def test_resolution_of_other_backends_is_untouched(tiny_model_dir):
    args = parse(["--model-path", tiny_model_dir, "--skip-tokenizer-init", "--device", "cpu",
                  "--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake"])
    args.resolve_once()
    assert json.loads(json.dumps(args.resolved_dict()["disaggregation_transfer_backend"])) == "mooncake"
