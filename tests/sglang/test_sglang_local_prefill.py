"""The plugin in a fresh SGLang process, and the local-prefill hooks on SGLang's real Scheduler class.

No model forward runs here (SGLang's CPU backend needs AMX and a source-built kernel): the hooks are
driven on a Scheduler instance whose batch-building collaborators are stand-ins, which checks the
routing and queue hand-over logic against SGLang's actual class, method names and NextBatchPlan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang", reason="needs .venv-sglang (scripts/test_sglang.sh)")

from ampd_plugin.connector.sglang.wire import AMPD_LOCAL_BOOTSTRAP_HOST  # noqa: E402

FRESH_PROCESS_PROBE = r"""
import json, sys
from importlib import metadata
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES
from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class
import sglang.srt.disaggregation.decode as decode, sglang.srt.disaggregation.prefill as prefill
from sglang.srt.managers.scheduler import Scheduler
b = TransferBackend("ampd")
eps = {ep.name: ep.value for ep in metadata.entry_points(group="sglang.srt.plugins")}
print(json.dumps({
    "entry_point": eps.get("ampd"),
    "choice": "ampd" in DISAGG_TRANSFER_BACKEND_CHOICES,
    "member": b.name,
    "distinct_from_mooncake": b is not TransferBackend.MOONCAKE,
    "classes": {ct.value: getattr(get_kv_class(b, ct), "__name__", None) for ct in KVClassType},
    "decode_lookup": decode.get_kv_class(b, KVClassType.RECEIVER).__name__,
    "prefill_lookup": prefill.get_kv_class(b, KVClassType.SENDER).__name__,
    "mooncake_untouched": get_kv_class(TransferBackend.MOONCAKE, KVClassType.MANAGER).__name__,
    "hooked": [hasattr(Scheduler._add_request_to_queue, "__wrapped__"),
               hasattr(Scheduler.get_next_disagg_decode_batch_to_run, "__wrapped__"),
               hasattr(Scheduler.is_fully_idle, "__wrapped__")],
}))
"""


def test_plugin_loads_through_entry_point_in_fresh_process():
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PROBE], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["entry_point"] == "ampd_plugin.connector.sglang.register:register"
    assert got["choice"] and got["member"] == "AMPD" and got["distinct_from_mooncake"]
    assert got["classes"] == {"kvargs": "KVArgs", "manager": "AmpdKVManager", "sender": "AmpdKVSender",
                              "receiver": "AmpdKVReceiver", "bootstrap_server": "AmpdKVBootstrapServer"}
    assert got["decode_lookup"] == "AmpdKVReceiver" and got["prefill_lookup"] == "AmpdKVSender"
    assert got["mooncake_untouched"] == "MooncakeKVManager"
    assert got["hooked"] == [True, True, True]


def test_import_ampd_plugin_never_imports_sglang():
    code = ("import sys, ampd_plugin, ampd_plugin.connector, ampd_plugin.connector.sglang, "
            "ampd_plugin.connector.sglang.register, ampd_plugin.connector.sglang.wire, "
            "ampd_plugin.router.sglang_wire\n"
            "assert 'sglang' not in sys.modules, 'sglang imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------- hooks on the Scheduler class
class FakeBatch:
    """The slice of ScheduleBatch the hooks touch."""

    def __init__(self, reqs):
        self.reqs = list(reqs)
        self.batch_is_full = False
        self.merged = []

    def batch_size(self):
        return len(self.reqs)

    def is_empty(self):
        return not self.reqs

    def filter_batch(self, reqs_to_exclude=()):
        self.reqs = [r for r in self.reqs if r not in reqs_to_exclude and not r.finished]

    def merge_batch(self, other):
        self.merged.append(other)
        self.reqs += other.reqs


def make_req(rid, host):
    return SimpleNamespace(rid=rid, bootstrap_host=host, finished=False,
                           time_stats=SimpleNamespace(set_wait_queue_entry_time=lambda: None,
                                                 set_decode_prealloc_queue_entry_time=lambda: None))


@pytest.fixture
def scheduler():
    from sglang.srt.disaggregation.utils import DisaggregationMode, TransferBackend
    from sglang.srt.managers.scheduler import NextBatchPlan, Scheduler
    from sglang.srt.plugins import load_plugins

    load_plugins()
    s = object.__new__(Scheduler)  # the real class and its (hooked) methods; collaborators stubbed below
    s.disaggregation_mode = DisaggregationMode.DECODE
    s.transfer_backend = TransferBackend("ampd")
    s.waiting_queue = []  # on a decode server: transferred requests waiting for their prebuilt batch
    s.chunked_req = None
    s.scheduler_stage_metrics = None
    s.prealloc = []
    s.disagg_decode_prealloc_queue = SimpleNamespace(add=lambda req, is_retracted=False: s.prealloc.append(req))
    s._set_or_validate_priority = lambda req: True
    s.dp_attn_adapter = SimpleNamespace(maybe_prepare_mlp_sync_batch=lambda b, **kw: b)
    s.update_running_batch = lambda batch: batch
    s.get_new_prebuilt_batch = lambda running_batch: None
    s.prefill_calls = []

    def get_new_batch_prefill(running_batch):
        # SGLang's prefill admission reads self.waiting_queue: it must be the local queue here.
        s.prefill_calls.append(list(s.waiting_queue))
        admitted, s.waiting_queue[:] = list(s.waiting_queue), []
        return NextBatchPlan(batch_to_run=FakeBatch(admitted) if admitted else None, running_batch=running_batch)

    s.get_new_batch_prefill = get_new_batch_prefill
    return s


def test_local_requests_skip_the_transfer_queue(scheduler):
    from ampd_plugin.connector.sglang.local_prefill import state_of

    local, remote = make_req("a", AMPD_LOCAL_BOOTSTRAP_HOST), make_req("b", "10.0.0.1")
    scheduler._add_request_to_queue(local)
    scheduler._add_request_to_queue(remote)
    assert state_of(scheduler).queue == [local]
    assert scheduler.prealloc == [remote]
    assert scheduler.waiting_queue == []


def test_local_prefill_runs_then_joins_decoding(scheduler):
    from ampd_plugin.connector.sglang.local_prefill import state_of

    transferred = make_req("t", "10.0.0.1")
    scheduler.waiting_queue.append(transferred)  # must not be touched by the local prefill step
    running = FakeBatch([make_req("r", "10.0.0.1")])
    local = make_req("a", AMPD_LOCAL_BOOTSTRAP_HOST)
    scheduler._add_request_to_queue(local)

    plan = scheduler.get_next_disagg_decode_batch_to_run(running)
    assert scheduler.prefill_calls == [[local]]
    assert plan.batch_to_run.reqs == [local]  # an EXTEND batch of the local request
    assert scheduler.waiting_queue == [transferred] and state_of(scheduler).queue == []

    # Next step: the finished-prefill request is merged into the decode batch, decode runs.
    plan = scheduler.get_next_disagg_decode_batch_to_run(plan.running_batch)
    assert [r.rid for r in plan.running_batch.reqs] == ["r", "a"]
    assert plan.batch_to_run is plan.running_batch
    assert state_of(scheduler).started == 1


def test_pending_chunk_keeps_prebuilt_merges_back(scheduler):
    chunk = make_req("c", AMPD_LOCAL_BOOTSTRAP_HOST)
    chunk.extend_end, chunk.prefix_len = 8, 0
    stashed = []
    scheduler.stash_chunked_request = stashed.append
    scheduler.chunked_req = chunk
    scheduler.get_new_batch_prefill = lambda rb: __import__(
        "sglang.srt.managers.scheduler", fromlist=["NextBatchPlan"]).NextBatchPlan(batch_to_run=None, running_batch=rb)
    scheduler.get_new_prebuilt_batch = lambda rb: pytest.fail("prebuilt merge while a chunk is pending")
    running = FakeBatch([make_req("r", "h")])
    plan = scheduler.get_next_disagg_decode_batch_to_run(running)
    assert stashed == [chunk] and plan.batch_to_run is running


def test_other_backends_and_modes_pass_through(scheduler):
    from sglang.srt.disaggregation.utils import TransferBackend

    scheduler.transfer_backend = TransferBackend.MOONCAKE
    local = make_req("a", AMPD_LOCAL_BOOTSTRAP_HOST)
    scheduler._add_request_to_queue(local)
    assert scheduler.prealloc == [local]  # SGLang's own path: no local prefill without the ampd backend
    assert scheduler.get_next_disagg_decode_batch_to_run(FakeBatch([])).batch_to_run is None
    assert scheduler.prefill_calls == []


def test_local_prefill_disabled_by_env(scheduler, monkeypatch):
    monkeypatch.setenv("AMPD_SGLANG_LOCAL_PREFILL", "0")
    local = make_req("a", AMPD_LOCAL_BOOTSTRAP_HOST)
    scheduler._add_request_to_queue(local)
    assert scheduler.prealloc == [local]


def test_queued_local_work_is_not_idle(scheduler):
    import ampd_plugin.connector.sglang.local_prefill as lp

    assert lp.is_fully_idle_around(lambda self: True, scheduler) is True
    scheduler._add_request_to_queue(make_req("a", AMPD_LOCAL_BOOTSTRAP_HOST))
    assert lp.is_fully_idle_around(lambda self: True, scheduler) is False
    assert lp.is_fully_idle_around(lambda self: False, scheduler) is False
