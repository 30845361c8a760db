"""Routes and strategies composed from the sub-request primitives, checked against the real wire schema."""

from ampd_plugin.connector import params as wire
from ampd_plugin.router import primitives as prim

URLS = {"prefill-0": "http://127.0.0.1:8010", "decode-0": "http://127.0.0.1:8020", "decode-1": "http://127.0.0.1:8021"}
SOURCE = wire.response_params(source=wire.SourceDescriptor(
    engine="e", te="127.0.0.1:1", notify="tcp://127.0.0.1:2", xfer="xfer-1", blocks=(0,), tokens=16,
    block_size=16, block_bytes=8, bases=(1,)))


def kv(step, previous=None):
    return wire.parse(step.kv_params("sess", URLS.__getitem__, previous, lambda: "xfer-1"))


def test_local_plan_is_one_generate_with_retention():
    plan = prim.local_plan(prim.RoundShape("decode-0", 100, 60))
    assert [s.op for s in plan.steps] == ["generate"] and plan.queue_worker == "decode-0"
    p = kv(plan.generate)
    assert p.role == "local" and p.session == "sess" and p.wants_retention
    assert plan.generate.begin == 60


def test_remote_plan_reads_history_and_returns_increment():
    plan = prim.remote_plan(prim.RoundShape("decode-0", 100, 60), "prefill-0")
    pre, gen = plan.steps
    assert (pre.op, pre.worker, gen.worker) == ("prefill", "prefill-0", "decode-0")
    assert plan.queue_worker == "prefill-0"
    p = kv(pre)
    assert p.role == "prefill" and p.history.tokens == 60 and p.history.source.format() == URLS["decode-0"]
    d = kv(gen, SOURCE)
    assert d.role == "decode" and d.source.xfer == "xfer-1"


def test_first_round_remote_has_no_history_read():
    pre, _ = prim.remote_plan(prim.RoundShape("decode-0", 100, 0), "prefill-0").steps
    assert kv(pre).history is None


def test_balanced_pd_splits_the_prompt():
    plan = prim.balanced_pd_plan(prim.RoundShape("decode-0", 100, 0), "prefill-0", 0.7)
    pre, gen = plan.steps
    assert pre.end == 70 and gen.begin == 70 and plan.notes["split"] == 70
    # D already holds more than P's share: P has nothing to do
    assert prim.balanced_pd_plan(prim.RoundShape("decode-0", 100, 80), "prefill-0", 0.7).name == "local"


def test_migration_reads_history_from_the_old_worker():
    plan = prim.migration_plan(prim.RoundShape("decode-1", 100, 60), "decode-0")
    assert [s.op for s in plan.steps] == ["generate"] and plan.queue_worker == "decode-1"
    p = kv(plan.generate)
    assert p.role == "decode" and p.history.tokens == 60 and p.history.source.format() == URLS["decode-0"]
    assert prim.migration_plan(prim.RoundShape("decode-1", 100, 0), "decode-0").name == "local"
