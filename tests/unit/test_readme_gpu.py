"""The README's "Using it on a GPU cluster" commands parse with the real parsers, so the section cannot drift:
vLLM's own argument parser (and the connector's config check), our CLI's click commands, the pip extras, and
SGLang's server arguments when .venv-sglang exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Using it on a GPU cluster"


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "README lost its GPU section"
    body = text.split(SECTION, 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]


def commands() -> list[list[str]]:
    """Every command of the section's bash blocks as argv: line continuations joined, comments dropped,
    `NAME=value` lines remembered and "$NAME" expanded, leading `NAME=value` environment assignments kept
    as a first element {"env": ...}."""
    out, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", _section(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            argv = shlex.split(line, comments=True)
            env = {}
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                k, v = argv.pop(0).split("=", 1)
                env[k] = v
            if not argv:
                variables.update(env)
                continue
            argv = [re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), a)
                    for a in argv]
            out.append([json.dumps(env)] + argv)
    return out


def _pick(prefix: list[str]) -> list[tuple[dict, list[str]]]:
    found = [(json.loads(c[0]), c[1:]) for c in commands() if c[1:1 + len(prefix)] == prefix]
    return found


def test_the_section_has_the_commands_this_test_checks():
    assert len(_pick(["vllm", "serve"])) >= 2
    assert len(_pick(["python", "-m", "sglang.launch_server"])) >= 2
    assert {c[1] for _, c in _pick(["ampd-plugin"])} >= {"route", "plan", "profile", "simulate", "loadtest"}


def test_vllm_commands_parse_with_vllms_own_parser_and_the_connector_config():
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from ampd_plugin.connector.params import format_worker_address
    from ampd_plugin.connector.vllm.config import AMPDConnectorConfig

    workers = []
    for env, argv in _pick(["vllm", "serve"]):
        ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", argv[2]] + argv[3:])
        assert ns.tensor_parallel_size >= 1 and ns.pipeline_parallel_size == 1
        kv = ns.kv_transfer_config
        assert (kv.kv_connector, kv.kv_role) == ("ampd", "kv_both")
        cfg = AMPDConnectorConfig.from_extra_config(kv.kv_connector_extra_config)  # unknown keys raise
        assert env.get("VLLM_HOST_IP") == ns.host  # the advertised address is the one served on
        workers.append((format_worker_address(f"http://{ns.host}:{ns.port}"), cfg))
    urls = {u for u, _ in workers}
    if len({u.split(":")[1] for u in urls}) > 1:  # workers on several hosts: each lists the others as peers
        for _, cfg in workers:
            assert urls <= set(cfg.peers), "a multi-host example must list every worker in peers"
    # The router command points at exactly these workers.
    (_, route), = [c for c in _pick(["ampd-plugin", "route"]) if "--engine" not in c[1]]
    named = {format_worker_address(route[i + 1]) for i, a in enumerate(route) if a in ("--prefill", "--decode")}
    assert named == urls


def test_our_cli_commands_parse_with_their_click_definitions():
    from ampd_plugin.cli import main

    seen = 0
    for _, argv in _pick(["ampd-plugin"]):
        cmd = main.get_command(None, argv[1])
        assert cmd is not None, f"README names an unknown command: {argv[1]}"
        cmd.make_context(argv[1], argv[2:])  # click.UsageError/BadParameter on any drifted flag or value
        seen += 1
    assert seen >= 6


def test_pip_extras_exist():
    import tomllib

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for _, argv in _pick(["pip", "install"]):
        for spec in argv[2:]:
            m = re.match(r"^ampd-plugin\[(.*)\]$", spec)
            if m:
                assert set(m.group(1).split(",")) <= extras, spec


SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
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
    out.append([ns.tp_size, ns.disaggregation_mode, ns.disaggregation_transfer_backend, ns.host, ns.port,
                ns.disaggregation_bootstrap_port])
print(json.dumps(out))
"""


@pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason="needs .venv-sglang (scripts/setup_sglang_venv.sh)")
def test_sglang_commands_parse_with_sglangs_server_args():
    argvs = [argv[3:] for _, argv in _pick(["python", "-m", "sglang.launch_server"])]
    proc = subprocess.run([str(SGLANG_PYTHON), "-c", SGLANG_PARSE], input=json.dumps(argvs), text=True,
                          capture_output=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {p[2] for p in parsed} == {"ampd"} and {p[1] for p in parsed} == {"prefill", "decode"}
    assert len({p[0] for p in parsed}) == 1  # the SGLang backend needs equal TP
    (_, route), = [c for c in _pick(["ampd-plugin", "route"]) if "--engine" in c[1]]
    prefill = [p for p in parsed if p[1] == "prefill"]
    named = [route[i + 1] for i, a in enumerate(route) if a == "--prefill"]
    assert named == [f"http://{p[3]}:{p[4]}" for p in prefill]
    ports = [int(route[i + 1]) for i, a in enumerate(route) if a == "--bootstrap-port"]
    assert ports == [p[5] for p in prefill]
