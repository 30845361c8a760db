"""Shared real-engine fixtures: the tiny model and one P + one D vLLM-CPU worker with the `ampd` connector,
plus one plain vLLM instance as the greedy reference. Started once per test session, stopped by PID.

The Mooncake transfer engine binds all interfaces, so the cluster refuses to start outside a loopback-only
network namespace (scripts/test.sh runs the suite inside one) unless AMPD_ALLOW_HOST_NETWORK=1.
vLLM servers must never run concurrently with another helper's: the fixture takes `/tmp/ampd-engines.lock`
itself unless the run is already wrapped in `flock /tmp/ampd-engines.lock ...` (detected from the parent
processes) or AMPD_ENGINE_LOCK_HELD=1.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from ampd_plugin import localcluster as lc
from ampd_plugin.tiny_model import PRESETS, build_tiny_model

# Short deadlines so failure tests finish quickly (a 10 s lease lets lease tests outwait it); everything
# else at its default. `peers` is added per cluster (the workers' URLs and one spare port).
TEST_EXTRA_CONFIG = {"protocol": "tcp", "transfer_timeout_s": 3, "http_timeout_s": 5, "max_history_wait_s": 20,
                     "retention_ttl_s": 120, "hold_ttl_s": 10}
BLOCK_SIZE = 128  # vLLM-CPU default


@dataclasses.dataclass
class Cluster:
    prefill: lc.VllmServer
    decode: lc.VllmServer
    plain: lc.VllmServer
    model: Path
    kv_bytes_per_token: int
    block_size: int = BLOCK_SIZE
    spare_peer_port: int = 0  # listed in the workers' `peers` but served by nobody (tests bind it)
    extra_config: dict = dataclasses.field(default_factory=lambda: dict(TEST_EXTRA_CONFIG))

    @property
    def lease_s(self) -> float:
        return self.extra_config["hold_ttl_s"]

    @property
    def servers(self) -> list[lc.VllmServer]:
        return [self.prefill, self.decode, self.plain]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The shared tiny Llama (built once into the cache, keyed by its parameters)."""
    return build_tiny_model("tiny")


def _ancestor_holds_engine_lock() -> bool:
    """True when this process runs under `flock /tmp/ampd-engines.lock ...` (taking it again would deadlock)."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if cmd and cmd[0].endswith(b"flock") and lc.ENGINE_LOCK.encode() in cmd:
            return True
        pid = int(stat.rpartition(")")[2].split()[1])
    return False


@pytest.fixture(scope="session")
def engine_lock():
    """Hold the machine-wide engine lock for the session (unless the caller already holds it)."""
    if (os.environ.get("AMPD_ENGINE_LOCK_HELD") == "1" or os.environ.get("AMPD_TEST_ATTACH")
            or _ancestor_holds_engine_lock()):
        yield
        return
    with open(lc.ENGINE_LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cluster_secret(tmp_path_factory) -> Path:
    """The cluster secret, in a 0600 file named by AMPD_CLUSTER_SECRET_FILE for every engine this session
    starts (so the suite exercises the authenticated path); the tests sign with it too."""
    import secrets

    from ampd_plugin.connector import auth

    path = tmp_path_factory.mktemp("secret") / "cluster-secret"
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    os.environ.pop(auth.SECRET_ENV, None)
    os.environ[auth.SECRET_FILE_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def pd_cluster(tiny_model, engine_lock, cluster_secret) -> Cluster:
    """P (core 0) and D (core 1) with the ampd connector, and a plain reference instance (core 0)."""
    lc.require_isolated_netns("the integration cluster (vLLM workers with the ampd connector / Mooncake)")
    attach = os.environ.get("AMPD_TEST_ATTACH")
    if attach:  # developer mode: reuse servers started elsewhere ({"prefill": url, "decode": url, "plain": url})
        import json

        urls = json.loads(Path(attach).read_text())
        handles = [lc.attach_server(name, urls[name]) for name in ("prefill", "decode", "plain")]
        yield Cluster(*handles, model=tiny_model, kv_bytes_per_token=PRESETS["tiny"].kv_bytes_per_token())
        return
    log_dir = Path(os.environ.get("AMPD_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="ampd-it-"))
    servers: list[lc.VllmServer] = []
    try:
        common = dict(log_dir=log_dir, max_model_len=4096, kv_cache_gib=1, dev_mode=True)
        p_port, d_port, spare = lc.free_ports(3)
        extra = {**TEST_EXTRA_CONFIG, "peers": [f"http://127.0.0.1:{port}" for port in (p_port, d_port, spare)]}
        servers.append(lc.start_vllm(tiny_model, name="prefill", port=p_port, cpu=0, ampd=extra, **common))
        servers.append(lc.start_vllm(tiny_model, name="decode", port=d_port, cpu=1, ampd=extra, **common))
        servers.append(lc.start_vllm(tiny_model, name="plain", cpu=0, **common))
        lc.wait_healthy(servers, timeout_s=420)
        yield Cluster(*servers, model=tiny_model, kv_bytes_per_token=PRESETS["tiny"].kv_bytes_per_token(),
                      spare_peer_port=spare)
    finally:
        lc.stop_all(servers)


class PD:
    """Client-side flows against the cluster: exactly what the router sends (connector/params.py)."""

    def __init__(self, cluster: Cluster):
        self.c = cluster

    def reference(self, prompt: list[int], n: int) -> list[int]:
        return lc.output_ids(lc.completion(self.c.plain.url, prompt, max_tokens=n))

    def remote(self, prompt: list[int], n: int, *, session=None, history_tokens=0, prefill_prompt=None):
        """Flow a (history_tokens=0) or c (history read from D): P prefills, D reads from P and decodes.
        Returns (output ids, P's response params, D's response params)."""
        from ampd_plugin.connector import params as W

        p_params = W.remote_prefill_params(session=session, history_from=self.c.decode.url if history_tokens else None,
                                           history_tokens=history_tokens)
        p_ans = lc.completion(self.c.prefill.url, prefill_prompt or prompt, max_tokens=1, kv_transfer_params=p_params)
        p_kv = p_ans.get("kv_transfer_params")
        d_ans = lc.completion(self.c.decode.url, prompt, max_tokens=n,
                              kv_transfer_params=W.decode_params(p_kv, session=session))
        return lc.output_ids(d_ans), p_kv, d_ans.get("kv_transfer_params")

    def local(self, prompt: list[int], n: int, *, session=None, retain=None):
        """Flow b: straight to D, which computes only what its prefix cache lacks."""
        from ampd_plugin.connector import params as W

        ans = lc.completion(self.c.decode.url, prompt, max_tokens=n,
                            kv_transfer_params=W.local_params(session=session, retain=retain))
        return lc.output_ids(ans), ans.get("kv_transfer_params")

    @staticmethod
    def sign(source):
        """``source`` signed with the cluster secret, as a trusted (possibly broken) peer would send it."""
        from ampd_plugin.connector.auth import ClusterAuth, load_secret

        return ClusterAuth(load_secret()).sign_source(source)

    @staticmethod
    def counter(url: str, name: str) -> float:
        """An ampd connector counter (``vllm:ampd_<name>_total``) on a worker."""
        return lc.metric_sum(lc.scrape_metrics(url), f"vllm:ampd_{name}_total")

    @staticmethod
    def prompt_sources(url: str) -> dict[str, float]:
        m = lc.scrape_metrics(url)
        return {s: lc.metric_sum(m, "vllm:prompt_tokens_by_source_total", source=s)
                for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}


@pytest.fixture(scope="session")
def pd(pd_cluster) -> PD:
    return PD(pd_cluster)


@pytest.fixture
def tokens():
    """A deterministic source of fresh token ids (ids 10..3999 avoid the special tokens); per-test seed."""
    import random
    import zlib

    def make(n: int, seed: str) -> list[int]:
        rng = random.Random(zlib.crc32(seed.encode()))
        return [rng.randrange(10, 4000) for _ in range(n)]

    return make


# ------------------------------------------------------------------------------ tensor parallelism
TP_DTYPE = "float32"
"""TP tests serve float32: a TP-2 engine sums partial products in another order than a TP-1 engine, which in
bf16 changes greedy tokens; in float32 the difference stays far below the tiny model's logit gaps."""


def start_engines(model: Path, specs: dict[str, dict], log_dir: Path, *, ampd_extra: dict | None = None,
                  timeout_s: float = 600) -> dict[str, lc.VllmServer]:
    """Start named engines ``{name: {"tp": 1|2, "ampd": bool}}`` with the given model in float32, wait until
    all are healthy and return them (stopped by the caller with `lc.stop_all`). Every ampd engine lists every
    other one in its ``peers``. A TP-2 engine binds one OMP thread per rank to cores 0 and 1."""
    ports = dict(zip(specs, lc.free_ports(len(specs))))
    extra = {**TEST_EXTRA_CONFIG, **(ampd_extra or {}),
             "peers": [f"http://127.0.0.1:{ports[n]}" for n, s in specs.items() if s.get("ampd")]}
    servers: dict[str, lc.VllmServer] = {}
    try:
        for i, (name, spec) in enumerate(specs.items()):
            tp = spec.get("tp", 1)
            servers[name] = lc.start_vllm(
                model, name=name, port=ports[name], cpu="0|1" if tp == 2 else i % 2,
                ampd=extra if spec.get("ampd") else False, log_dir=log_dir, max_model_len=4096, kv_cache_gib=1,
                dev_mode=True, dtype=TP_DTYPE, extra_args=["--tensor-parallel-size", str(tp)] if tp > 1 else [])
        lc.wait_healthy(servers.values(), timeout_s=timeout_s)
        return servers
    except BaseException:
        lc.stop_all(servers.values())
        raise


@pytest.fixture(scope="session")
def engine_starter():
    """`start_engines`, for test modules that start their own engines (a fixture, so no module imports conftest)."""
    return start_engines
