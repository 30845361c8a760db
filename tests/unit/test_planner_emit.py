"""Emitted launch artefacts: vLLM's own parser accepts every worker command, scripts pass `bash -n`,
SGLang flags, cpu-demo specifics, and byte-identical output for identical inputs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ampd_plugin.planner.emit import RouterOptions, build_deployment, render_script, write_deployment
from ampd_plugin.planner.placement import place
from ampd_plugin.planner.search import Candidate


def deployment(engine="vllm", target="gpu", prefill=None, decode=None, gpus=16, per_node=8):
    cand = Candidate(prefill or {2: 3}, decode or {4: 2}, 0.5)
    placement = place(cand, gpus, per_node)
    return build_deployment(cand.label(), placement, engine, "meta-llama/Llama-3.1-70B-Instruct",
                            RouterOptions("ampd", 2.0, 0.1), target=target, max_model_len=8192)


def _concrete(arg: str) -> str:
    return arg.replace("${NODE0_HOST}", "127.0.0.1").replace("${NODE1_HOST}", "127.0.0.2")


@pytest.fixture(scope="module")
def vllm_parser():
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return lambda: make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("target", ["gpu", "cpu-demo"])
def test_vllm_parser_accepts_every_worker_command(vllm_parser, target):
    kw = dict(prefill={1: 1}, decode={1: 1}, gpus=2, per_node=2) if target == "cpu-demo" else {}
    dep = deployment(target=target, **kw)
    for w in dep.workers:
        argv = [_concrete(a) for a in w.argv]
        if argv[:2] == ["vllm", "serve"]:
            args = ["--model", argv[2]] + argv[3:]  # `vllm serve MODEL` == api_server --model MODEL
        else:
            assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
            args = argv[3:]
        ns = vllm_parser().parse_args(args)
        assert ns.tensor_parallel_size == w.tp
        assert ns.port == w.port
        assert ns.kv_transfer_config.kv_connector == "ampd"
        assert ns.max_model_len == 8192


def test_devices_follow_placement_and_ports_are_unique_per_node():
    dep = deployment()
    seen_ports, seen_devices = set(), set()
    for w in dep.workers:
        assert w.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, w.devices))
        assert len(w.devices) == w.tp
        assert (w.node, w.port) not in seen_ports
        seen_ports.add((w.node, w.port))
        for d in w.devices:
            assert (w.node, d) not in seen_devices
            seen_devices.add((w.node, d))


def test_sglang_commands():
    dep = deployment(engine="sglang", prefill={4: 2}, decode={4: 2})
    for w in dep.workers:
        argv = w.argv
        assert argv[:3] == ["python", "-m", "sglang.launch_server"]
        assert argv[argv.index("--disaggregation-mode") + 1] == w.kind
        assert argv[argv.index("--disaggregation-transfer-backend") + 1] == "ampd"
        assert argv[argv.index("--tp-size") + 1] == str(w.tp)
        if w.kind == "prefill":
            assert "--disaggregation-bootstrap-port" in argv


def test_router_command_lists_all_workers():
    dep = deployment()
    argv = dep.router_argv
    assert argv[:2] == ["ampd-plugin", "route"]
    assert argv.count("--prefill") == 3 and argv.count("--decode") == 2
    for flag, value in (("--policy", "ampd"), ("--kv-connector", "ampd"), ("--ttft-slo", "2"), ("--itl-slo", "0.1")):
        assert argv[argv.index(flag) + 1] == value


def test_sglang_router_command_names_the_engine_and_each_prefill_bootstrap_port():
    dep = deployment(engine="sglang", prefill={4: 2}, decode={4: 2})
    argv = dep.router_argv
    assert argv[argv.index("--engine") + 1] == "sglang"
    prefill = [w for w in dep.workers if w.kind == "prefill"]
    ports = [argv[i + 1] for i, a in enumerate(argv) if a == "--bootstrap-port"]
    assert ports == [str(w.bootstrap_port) for w in prefill]
    assert "--engine" not in deployment().router_argv


@pytest.mark.parametrize("engine,target", [("vllm", "gpu"), ("sglang", "gpu"), ("vllm", "cpu-demo")])
def test_scripts_pass_bash_n(tmp_path, engine, target):
    kw = dict(prefill={1: 1}, decode={1: 1}, gpus=2, per_node=2) if target == "cpu-demo" else {}
    if engine == "sglang":
        kw = dict(prefill={4: 2}, decode={4: 2})
    dep = deployment(engine=engine, target=target, **kw)
    script, desc = write_deployment(dep, tmp_path / "d")
    subprocess.run(["bash", "-n", str(script)], check=True)
    data = yaml.safe_load(desc.read_text())
    assert data["workers"][0]["argv"] == dep.workers[0].argv
    text = script.read_text()
    if target == "cpu-demo":
        assert "ip netns exec" in text and "VLLM_CPU_OMP_THREADS_BIND" in text
        assert "python -m vllm.entrypoints.openai.api_server" in text
    else:
        assert "CUDA_VISIBLE_DEVICES=" in text


def test_cpu_demo_needs_vllm():
    with pytest.raises(ValueError, match="SGLang has no CPU path"):
        deployment(engine="sglang", target="cpu-demo", prefill={1: 1}, decode={1: 1}, gpus=2, per_node=2)


def test_emission_is_deterministic(tmp_path):
    a = render_script(deployment())
    b = render_script(deployment())
    assert a == b


def test_colocated_deployment_moves_no_kv():
    cand = Candidate({}, {2: 2}, 0.5)
    dep = build_deployment(cand.label(), place(cand, 4, 4), "vllm", "m", RouterOptions("colocated"))
    assert all("--kv-transfer-config" not in w.argv for w in dep.workers)
    assert dep.router_argv[dep.router_argv.index("--kv-connector") + 1] == "none"
    assert "--prefill" not in dep.router_argv


SGLANG_PYTHON = Path(__file__).resolve().parents[2] / ".venv-sglang" / "bin" / "python"
SGLANG_PARSE = """
import argparse, json, sys
from ampd_plugin.connector.sglang.register import register
register()
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
out = []
for argv in json.loads(sys.stdin.read()):
    ns = parser.parse_args(argv)
    out.append([ns.tp_size, ns.disaggregation_mode, ns.disaggregation_transfer_backend, ns.port])
print(json.dumps(out))
"""


@pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason="needs .venv-sglang (scripts/setup_sglang_venv.sh)")
def test_sglang_parser_accepts_every_worker_command():
    """A hand-built deployment and every one `plan --engine sglang` emits for a real preset (equal TP)."""
    workers = deployment(engine="sglang", prefill={4: 2}, decode={4: 2}).workers
    for dep in _planned("sglang"):
        assert len({w.tp for w in dep.workers}) == 1, dep.label  # the SGLang backend needs equal TP
        workers += dep.workers
    argvs = [[_concrete(a) for a in w.argv[3:]] for w in workers]  # after `python -m sglang.launch_server`
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([str(SGLANG_PYTHON), "-c", SGLANG_PARSE], input=json.dumps(argvs), text=True,
                          capture_output=True, timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parsed == [[w.tp, w.kind, "ampd", w.port] for w in workers]


def _kv_config(w):
    return json.loads(_concrete(w.argv[w.argv.index("--kv-transfer-config") + 1]))


def test_multi_host_vllm_workers_list_their_peers_and_need_the_secret_file(tmp_path):
    dep = deployment()  # 16 GPUs on two 8-GPU nodes
    assert dep.nodes == 2
    urls = sorted(_concrete(f"http://${{NODE{w.node}_HOST}}:{w.port}") for w in dep.workers)
    for w in dep.workers:
        assert sorted(_kv_config(w)["kv_connector_extra_config"]["peers"]) == urls
        assert w.env["AMPD_CLUSTER_SECRET_FILE"] == "${AMPD_CLUSTER_SECRET_FILE:-}"  # a path, never the secret
    script, _ = write_deployment(dep, tmp_path / "d")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMPD_CLUSTER_SECRET")}
    proc = subprocess.run(["bash", str(script)], env={**env, "NODE": "1", "LOG_DIR": str(tmp_path / "logs")},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "set AMPD_CLUSTER_SECRET_FILE" in proc.stderr
    assert not (tmp_path / "logs").exists()  # refused before starting anything
    # One host: no allow-list needed (the connector accepts this host's own addresses); secret optional.
    single = deployment(prefill={2: 1}, decode={2: 1}, gpus=4, per_node=8)
    assert all("peers" not in _kv_config(w)["kv_connector_extra_config"] for w in single.workers)
    assert "set AMPD_CLUSTER_SECRET_FILE" not in render_script(single)
    # SGLang's backend has no cluster secret (docs/sglang.md): nothing to pass.
    sgl = deployment(engine="sglang", prefill={4: 2}, decode={4: 2})
    assert all("AMPD_CLUSTER_SECRET_FILE" not in w.env for w in sgl.workers)


def test_cpu_demo_binds_one_core_per_tp_rank():
    dep = deployment(target="cpu-demo", prefill={2: 1}, decode={1: 1}, gpus=3, per_node=3)
    binds = {w.kind: w.env["VLLM_CPU_OMP_THREADS_BIND"] for w in dep.workers}
    assert binds["prefill"] == "0|1" and binds["decode"] == "2"


def _planned(engine, model="Llama-3.1-70B", gpus=32, workload="toolbench", rate=2.0):
    """Every candidate `plan` would emit for a real model preset (roofline on H20), without simulating."""
    from ampd_plugin.costmodel import build_cost_model
    from ampd_plugin.planner.latency_tables import WorkloadStats
    from ampd_plugin.planner.search import PlanRequest, search
    from ampd_plugin.workload import load_workload

    stats = WorkloadStats.from_sessions(load_workload(workload, 60, rate, 0))
    req = PlanRequest(build_cost_model(model, "H20"), stats, rate, 8.0, 0.1, gpus, (1, 2, 4, 8), 8,
                      top_k=4, homogeneous=True, engine=engine)
    out = []
    for cand in search(req).candidates:
        out.append(build_deployment(cand.label(), cand.placement, engine, model, RouterOptions("ampd", 8.0, 0.1)))
    return out


@pytest.mark.parametrize("model", ["Llama-3.1-70B", "Mixtral-8x7B"])
def test_every_planned_vllm_deployment_parses_and_is_a_supported_layout(vllm_parser, model):
    from ampd_plugin.costmodel import Layout, load_model_spec, pair_refusal

    heads = load_model_spec(model).num_key_value_heads
    deps = _planned("vllm", model)
    assert deps
    for dep in deps:
        tps = {w.kind: w.tp for w in dep.workers}
        assert pair_refusal(heads, Layout(tps["prefill"]), Layout(tps["decode"])) is None, dep.label
        for w in dep.workers:
            ns = vllm_parser().parse_args(["--model", w.argv[2]] + [_concrete(a) for a in w.argv[3:]])
            assert ns.tensor_parallel_size == w.tp and ns.pipeline_parallel_size == 1
            assert ns.kv_transfer_config.kv_connector == "ampd"
            assert ns.kv_transfer_config.kv_role == "kv_both"
