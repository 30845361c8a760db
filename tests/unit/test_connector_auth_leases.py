"""KV-plane safety logic: the cluster secret, signatures, notices and replays, the peer allow-list,
leases (holder and reader side), the bounded socket cache, and a 10,000-round run of the scheduler and
worker halves (fake block pool and fake Mooncake, real ZMQ) with injected failures whose tables return
to zero."""

from __future__ import annotations

import dataclasses
import json
import random
import time
import types

import pytest

from ampd_plugin.connector import params as W
from ampd_plugin.connector.auth import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    AuthError,
    ClusterAuth,
    PeerAllowList,
    load_secret,
)
from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.holds import RETAIN, SOURCE, HoldTable
from ampd_plugin.connector.vllm.leases import LeaseKeeper
from ampd_plugin.connector.vllm.sockets import PushSockets

SECRET = b"0123456789abcdef-unit-test-secret"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _src(**over) -> W.SourceDescriptor:
    d = dict(engine="e1", te="127.0.0.1:15000", notify="tcp://127.0.0.1:16000", xfer="xfer-1", blocks=[3, 4],
             tokens=200, block_size=128, block_bytes=4096, bases=[1 << 20], expires=2000.0, lease_s=10.0)
    d.update(over)
    return W.SourceDescriptor.from_dict(d)


# ------------------------------------------------------------------------------------------- secret
def test_secret_from_env_or_file_never_both_never_short(tmp_path):
    assert load_secret({}) is None
    assert load_secret({SECRET_ENV: SECRET.decode()}) == SECRET
    f = tmp_path / "s"
    f.write_text(SECRET.decode() + "\n")
    assert load_secret({SECRET_FILE_ENV: str(f)}) == SECRET
    assert load_secret({SECRET_FILE_ENV: ""}) is None
    with pytest.raises(ValueError, match="not both"):
        load_secret({SECRET_ENV: SECRET.decode(), SECRET_FILE_ENV: str(f)})
    with pytest.raises(ValueError, match="at least 16 bytes") as exc:
        load_secret({SECRET_ENV: "short-secret"})
    assert "short-secret" not in str(exc.value)  # never echoed
    with pytest.raises(ValueError, match="cannot read"):
        load_secret({SECRET_FILE_ENV: str(tmp_path / "missing")})


# -------------------------------------------------------------------------------------- descriptors
def test_signed_descriptors_verify_and_any_change_is_refused():
    auth = ClusterAuth(SECRET)
    signed = auth.sign_source(_src())
    auth.verify_source(W.SourceDescriptor.from_dict(signed.to_dict()))  # survives the wire
    for change in [{"blocks": (3, 5)}, {"te": "10.0.0.9:15000"}, {"expires": 9999.0}, {"fingerprint": "x"}]:
        with pytest.raises(AuthError, match="signature is invalid"):
            auth.verify_source(dataclasses.replace(signed, **change))
    with pytest.raises(AuthError, match="unsigned"):
        auth.verify_source(_src())
    with pytest.raises(AuthError, match="invalid"):
        auth.verify_source(ClusterAuth(b"another-secret-of-16+bytes").sign_source(_src()))
    ClusterAuth(None).verify_source(_src())  # unauthenticated mode accepts
    assert ClusterAuth(None).sign_source(_src()).sig is None


def test_descriptor_schema_rejects_unknown_fields():
    with pytest.raises(W.ParamsError, match="unknown"):
        W.SourceDescriptor.from_dict({**_src().to_dict(), "extra": 1})
    with pytest.raises(W.ParamsError, match="expires"):
        W.SourceDescriptor.from_dict({**_src().to_dict(), "expires": "soon"})


# ------------------------------------------------------------------------------------------ notices
def test_notices_are_single_use_signed_and_fresh():
    clock = Clock()
    holder, reader = ClusterAuth(SECRET, clock), ClusterAuth(SECRET, clock)
    msg = reader.notice("done", "xfer-1")
    assert holder.check_notice(msg) == ("done", "xfer-1")
    with pytest.raises(AuthError, match="replayed"):
        holder.check_notice(msg)
    with pytest.raises(AuthError, match="unsigned"):
        holder.check_notice(json.dumps({"xfer": "xfer-1"}).encode().replace(b"}", b', "k": "done", "n": "a", "exp": 1e9}'))
    forged = json.loads(reader.notice("renew", "xfer-1"))
    forged["xfer"] = "xfer-2"
    with pytest.raises(AuthError, match="invalid signature"):
        holder.check_notice(json.dumps(forged).encode())
    late = reader.notice("done", "xfer-3")
    clock.t += 31
    with pytest.raises(AuthError, match="expired"):
        holder.check_notice(late)
    for junk in [b"", b"{}", b"[1]", json.dumps({"k": "steal", "xfer": "x", "n": "n", "exp": 1}).encode()]:
        with pytest.raises(AuthError, match="malformed"):
            holder.check_notice(junk)
    assert holder.replay_entries() == 0 or clock.t > 0  # expired nonces are dropped on the next check
    holder.check_notice(reader.notice("done", "xfer-4"))
    assert holder.replay_entries() == 1


def test_replay_cache_is_bounded_and_fails_closed():
    clock = Clock()
    holder, reader = ClusterAuth(SECRET, clock, replay_capacity=10), ClusterAuth(SECRET, clock)
    for i in range(10):
        holder.check_notice(reader.notice("done", f"x{i}"))
    with pytest.raises(AuthError, match="too many"):
        holder.check_notice(reader.notice("done", "x10"))
    clock.t += 31  # the remembered nonces expire and are forgotten
    holder.check_notice(reader.notice("done", "x11"))
    assert holder.replay_entries() == 1


def test_export_tokens_prove_the_secret_for_one_prompt_once():
    clock = Clock()
    reader, holder = ClusterAuth(SECRET, clock), ClusterAuth(SECRET, clock)
    ids = list(range(300))
    token = reader.export_token("x-h", ids)
    with pytest.raises(AuthError, match="invalid"):
        holder.verify_export(token, "x-h", ids[:-1])  # another prompt
    holder.verify_export(token, "x-h", ids)
    with pytest.raises(AuthError, match="replayed"):
        holder.verify_export(token, "x-h", ids)
    with pytest.raises(AuthError, match="not authenticated"):
        holder.verify_export(None, "x-h", ids)
    assert ClusterAuth(None).export_token("x", ids) is None
    ClusterAuth(None).verify_export(None, "x", ids)


def test_peer_allow_list():
    listed = PeerAllowList(["127.0.0.1:8010", "http://10.0.0.2:8020"])
    listed.check(W.WorkerAddress.parse("http://10.0.0.2:8020"))
    for bad in ["http://10.0.0.2:8021", "http://127.0.0.1:1", "http://169.254.169.254:80"]:
        with pytest.raises(AuthError, match="not a known peer"):
            listed.check(W.WorkerAddress.parse(bad))
    local = PeerAllowList([], own_hosts=["10.0.0.5"])
    local.check(W.WorkerAddress.parse("http://10.0.0.5:8000"))
    local.check(W.WorkerAddress.parse("http://127.0.0.1:8000"))
    with pytest.raises(AuthError, match="not on this host"):
        local.check(W.WorkerAddress.parse("http://192.0.2.7:8000"))


def test_config_requires_a_positive_lease_and_parses_peers():
    for bad in [{"hold_ttl_s": 0}, {"hold_ttl_s": -1}, {"lease_max_s": 0}]:
        with pytest.raises(ValueError, match="must be > 0"):
            AMPDConnectorConfig.from_extra_config(bad)
    cfg = AMPDConnectorConfig.from_extra_config({"peers": ["127.0.0.1:8010", "http://h:1"]})
    assert cfg.peers == ("http://127.0.0.1:8010", "http://h:1")
    with pytest.raises(ValueError, match="peers"):
        AMPDConnectorConfig.from_extra_config({"peers": ["http://h:1/path"]})


# ------------------------------------------------------------------------------------------- leases
def test_holder_lease_renewal_is_capped_and_only_for_exports():
    clock = Clock(0.0)
    table = HoldTable(lambda b: None, lambda b: None, clock)
    table.add("x", SOURCE, [1], ttl_s=10)
    table.add("r", RETAIN, [2], ttl_s=10)
    assert not table.renew("r", 10, 100) and not table.renew("nope", 10, 100)
    clock.t = 9
    assert table.renew("x", 10, 25) and table.remaining("x") == 10
    clock.t = 20
    table.renew("x", 10, 25)
    assert table.remaining("x") == 5  # capped at created + 25
    clock.t = 25
    assert table.release_expired() == ["x", "r"] or set(table.release_expired()) <= {"x", "r"}
    assert table.expired[SOURCE] == 1


def test_reader_lease_estimate_is_conservative():
    mono, wall = Clock(100.0), Clock(5000.0)
    sent: list[tuple[str, str]] = []
    ok = {"send": True}
    keeper = LeaseKeeper(lambda a, x: ok["send"] and not sent.append((a, x)), skew_s=2.0, clock=mono, wall=wall)
    keeper.track("r1", _src(expires=5010.0, lease_s=10.0))
    assert keeper.deadline("r1") == pytest.approx(108.0)  # 10 s left minus 2 s skew
    keeper.track("r0", _src(expires=None))
    assert keeper.deadline("r0") is None  # no lease info: not tracked
    mono.t = 102.0
    assert keeper.renew_due() == 0  # not due before a third of the lease
    mono.t = 104.0
    assert keeper.renew_due() == 1 and keeper.deadline("r1") == pytest.approx(114.0)
    ok["send"] = False
    mono.t = 108.0
    assert keeper.renew_due() == 0 and keeper.deadline("r1") == pytest.approx(114.0)  # not extended
    ok["send"] = True
    mono.t = 115.0
    assert keeper.renew_due() == 0  # too late: the pin may be gone, never pretend otherwise
    assert keeper.deadline("r1") == pytest.approx(114.0)
    assert keeper.untrack("r1") == 1 and len(keeper) == 0


def test_push_socket_cache_is_bounded_and_prunes_idle_peers():
    clock = Clock(0.0)
    made, closed = [], []

    class Sock:
        def __init__(self, addr):
            self.addr = addr

        def send(self, payload, flags=0):
            return None

        def close(self, linger=None):
            closed.append(self.addr)

    cache = PushSockets(capacity=3, idle_s=60, clock=clock, factory=lambda a, imm: made.append(a) or Sock(a))
    for i in range(5):
        assert cache.send(f"tcp://h:{i}", b"x")
    assert len(cache) == 3 and closed == ["tcp://h:0", "tcp://h:1"]
    cache.send("tcp://h:4", b"x")
    assert made.count("tcp://h:4") == 1  # reused
    clock.t = 61
    assert cache.prune() == 3 and len(cache) == 0


# ------------------------------------------------------------------------- 10,000 rounds, no leaks
class FakePool:
    """vLLM's block pool as the connector uses it: reference counts via touch/free_blocks."""

    def __init__(self, n: int):
        self.blocks = [types.SimpleNamespace(block_id=i, ref_cnt=0) for i in range(n)]

    def touch(self, blocks):
        for b in blocks:
            b.ref_cnt += 1

    def free_blocks(self, blocks):
        for b in blocks:
            assert b.ref_cnt > 0, "unpinned a block that was not pinned"
            b.ref_cnt -= 1

    def get_usage(self) -> float:
        return sum(1 for b in self.blocks if b.ref_cnt) / len(self.blocks)


class FakeTE:
    session = "127.0.0.1:15999"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def read(self, peer, lo, re, ln, timeout_s=None):
        if self.rng.random() < 0.15:
            from ampd_plugin.connector.transfer import TransferError

            raise TransferError("read", peer, "injected failure")
        return sum(ln)

    def close(self):
        return None


def _request(req_id, params, prompt, status=None):
    from vllm.v1.request import RequestStatus

    return types.SimpleNamespace(request_id=req_id, kv_transfer_params=params, prompt_token_ids=prompt,
                                 num_tokens=len(prompt), num_computed_tokens=len(prompt),
                                 status=status or RequestStatus.FINISHED_LENGTH_CAPPED)


def test_ten_thousand_rounds_with_injected_failures_leave_nothing_behind(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.request import RequestStatus

    from ampd_plugin.connector.vllm.metadata import AMPDHandshake
    from ampd_plugin.connector.vllm.scheduler import AMPDScheduler
    from ampd_plugin.connector.vllm.worker import AMPDWorker

    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    rng = random.Random(12)
    bs, n_blocks = 16, 512
    cfg = AMPDConnectorConfig.from_extra_config({"hold_ttl_s": 30, "retention_ttl_s": 60, "transfer_timeout_s": 1})
    vcfg = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=bs),
                                 parallel_config=types.SimpleNamespace(tensor_parallel_size=1),
                                 model_config=types.SimpleNamespace(served_model_name=["m"], model="m",
                                                                    get_total_num_kv_heads=lambda: 2))
    sched = AMPDScheduler(vcfg, cfg, "engine-unit", "127.0.0.1")
    pool = FakePool(n_blocks)
    clock = Clock(0.0)
    sched._holds._clock = clock  # expiries on a fake clock; leases and notices on real time
    sched.bind_block_pool(pool)
    worker = AMPDWorker(cfg, "127.0.0.1", n_blocks)
    worker.te = FakeTE(rng)
    worker.handshake = AMPDHandshake(te_session=FakeTE.session, bases=(1 << 20, 1 << 24), block_bytes=64,
                                     num_blocks=n_blocks, kv_heads=2, head_bytes=32)
    sched.set_worker_info({0: worker.handshake})
    stranger, peer_auth = PushSockets(), ClusterAuth(SECRET)
    outcomes = {"read": 0, "failed": 0, "refused": 0, "aborted": 0, "expired": 0, "notices_refused": 0}

    def output(finished, failed):
        return types.SimpleNamespace(finished_recving=finished, failed_recving=failed)

    def step():
        meta = sched.build_connector_meta(None)
        worker.start_loads(meta)
        for fut, _ in list(worker._inflight.values()):
            fut.exception(timeout=5)
        finished, failed = worker.transfer_results()
        sched.update_connector_output(output(finished, failed))
        return finished, failed

    rounds = 10_000
    for i in range(rounds):
        prompt = [rng.randrange(10, 4000) for _ in range(rng.randrange(20, 100))]
        blocks = rng.sample(range(n_blocks), -(-len(prompt) // bs))
        holder = _request(f"p{i}", W.remote_prefill_params(f"x{i}"), prompt)
        sched.on_new_request(holder)
        sched.get_num_new_matched_tokens(holder, 0)
        _, p_kv = sched.request_finished(holder, blocks)
        src = p_kv["ampd"]["source"]
        fault = rng.random()
        if fault < 0.1:    # a forged descriptor
            src = {**src, "blocks": list(reversed(src["blocks"]))}
        elif fault < 0.15:  # a stranger's unsigned notice, and a replayed genuine one
            stranger.send(src["notify"], json.dumps({"k": "done", "xfer": f"x{i}", "n": f"n{i}", "exp": 1e10}).encode())
            genuine = peer_auth.notice("done", f"other-{i}")
            stranger.send(src["notify"], genuine)
            stranger.send(src["notify"], genuine)
            outcomes["notices_refused"] += 2
        elif fault < 0.2:  # the reader never comes: the lease must expire
            clock.t += cfg.hold_ttl_s + 1
            step()
            outcomes["expired"] += 1
            continue
        reader = _request(f"d{i}", {"ampd": {"role": "decode", "xfer": f"x{i}", "source": src}}, prompt,
                          status=RequestStatus.FINISHED_ABORTED if rng.random() < 0.05 else None)
        sched.on_new_request(reader)
        n, is_async = sched.get_num_new_matched_tokens(reader, 0)
        if n is None or n == 0:
            outcomes["refused"] += 1
        else:
            local = rng.sample(range(n_blocks), len(blocks))
            sched.update_state_after_alloc(reader, types.SimpleNamespace(get_block_ids=lambda l=local: (l,)), n)
            if reader.status == RequestStatus.FINISHED_ABORTED and rng.random() < 0.5:
                sched.request_finished(reader, local)  # aborted before its load was even started
                outcomes["aborted"] += 1
                step()
                continue
            finished, failed = step()
            assert reader.request_id in finished
            outcomes["failed" if reader.request_id in failed else "read"] += 1
        _, d_kv = sched.request_finished(reader, [])
        if i % 50 == 0:
            step()  # drain notices now and then (the holder steps)
    deadline = time.monotonic() + 10
    while sched.counts()["source_holds"] and time.monotonic() < deadline:  # notices still in flight
        time.sleep(0.05)
        step()
    clock.t += cfg.lease_max_s + 1  # whatever a reader never released goes by its lease
    step()
    counts = sched.counts()
    assert counts["requests"] == 0 and counts["pending_loads"] == 0 and counts["leases"] == 0, counts
    assert counts["source_holds"] == 0 and counts["retain_holds"] == 0, counts
    assert counts["renew_sockets"] <= 1
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert worker.counts() == {"inflight": 0, "push_sockets": 1, "load_error_blocks": 0}
    assert min(outcomes.values()) > 0, outcomes  # every path was exercised
    stats = sched.stats().data
    assert stats["descriptors_refused"] >= 0.09 * rounds
    assert stats["notices_refused"] >= outcomes["notices_refused"] - 1
    assert stats["lease_expiries"] >= outcomes["expired"]
    sched.shutdown()
    worker.shutdown()
    stranger.close_all()
