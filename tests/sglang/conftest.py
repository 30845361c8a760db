"""Fixtures for the SGLang tests. They need `.venv-sglang` (scripts/setup_sglang_venv.sh); under any other
interpreter every test here is skipped with that reason. Run: scripts/test_sglang.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
PEER = HERE / "pd_peer.py"
REPLY_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(config, items):
    try:
        import sglang  # noqa: F401

        skip = None
    except ImportError:
        skip = pytest.mark.skip(reason="needs SGLang: run scripts/test_sglang.sh (uses .venv-sglang)")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.sglang)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A model directory with only a config.json: enough for SGLang's argument resolution (no weights
    are loaded anywhere in these tests)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama-config")
    LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, architectures=["LlamaForCausalLM"],
    ).save_pretrained(path)
    return str(path)


class PeerProcess:
    """A pd_peer.py subprocess (one SGLang scheduler's transfer side) and its JSON-lines channel."""

    def __init__(self, role: str, bootstrap_port: int, model_dir: str, log_dir: Path, name: str):
        self.role = role
        self.log_path = log_dir / f"{name}.log"
        env = dict(os.environ, SGLANG_HOST_IP="127.0.0.1", AMPD_SGLANG_TRANSFER_TIMEOUT_S="5",
                   SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL="2", SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE="1",
                   PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), role, str(bootstrap_port), model_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=REPO,
        )
        self.info = None

    def _read(self) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(REPLY_TIMEOUT_S):
            raise TimeoutError(f"{self.role} peer gave no answer in {REPLY_TIMEOUT_S}s; log tail:\n{self.tail()}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.role} peer exited ({self.proc.poll()}); log tail:\n{self.tail()}")
        return json.loads(line)

    def ready(self) -> dict:
        self.info = self._read()
        assert self.info.get("ready"), f"{self.role} peer failed to start: {self.info}\n{self.tail()}"
        return self.info

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        assert "error" not in reply, f"{self.role}.{op} failed: {reply['error']}\n{self.tail()}"
        return reply

    def tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_peers(tiny_model_dir, tmp_path):
    """start_peers(("prefill", port), ("decode", port), ...) -> PeerProcess list, started concurrently and
    stopped by PID at the end. Refuses to start Mooncake outside a loopback-only network namespace."""
    from ampd_plugin.localcluster import require_isolated_netns

    require_isolated_netns("Mooncake transfer engines for the SGLang backend tests")
    started: list[PeerProcess] = []

    def start(*specs):
        peers = [PeerProcess(role, port, tiny_model_dir, tmp_path, f"{role}-{len(started) + i}")
                 for i, (role, port) in enumerate(specs)]
        started.extend(peers)
        for peer in peers:
            peer.ready()
        return peers

    yield start
    for peer in started:
        peer.stop()

