"""Local incremental prefill on an SGLang decode worker (AMPD's `local` route), via two scheduler hooks.

SGLang 0.5.23 decode servers only ever *receive* KV: every request goes to the pre-allocation/transfer
queue, and a request without `bootstrap_room` is rejected. But the mode-agnostic prefill machinery is all
there on a decode scheduler — `get_new_batch_prefill` (PrefillAdder, radix-cache prefix match, chunking),
`process_batch_result` sends EXTEND batches to the generic `process_batch_result_prefill`, and with
`--disaggregation-decode-enable-radix-cache` the tree cache keeps each finished round's KV. So:

1. `Scheduler._add_request_to_queue` (AROUND): on a decode worker, a request whose `bootstrap_host` is
   the router's sentinel (`wire.AMPD_LOCAL_BOOTSTRAP_HOST`) goes to a local queue instead of the
   transfer pre-allocation queue (the router still sends a `bootstrap_room`, so SGLang's own admission
   check passes).
2. `Scheduler.get_next_disagg_decode_batch_to_run` (AROUND): first fold the previous local EXTEND batch
   into the running decode batch (what the normal scheduler does with `last_batch`, stashing an
   unfinished chunk), then, while local work waits, run `get_new_batch_prefill` with the local queue in
   the place of `waiting_queue`. The prefix match hits the history the decode worker already holds, so
   only the new tokens are computed. Otherwise SGLang's decode step runs unchanged.
3. `Scheduler.is_fully_idle` (AROUND): queued local work counts as busy, so idle housekeeping (the
   memory-leak check) never runs while a local request or chunk holds pages.

Checked against SGLang 0.5.23 (code reading + the hooks installing on the real Scheduler class; no model
forward could run on this CPU-only machine): normal event loop, chunked prefill (a chunk in flight keeps
prebuilt merges back until it finishes). Refused at start-up (`checks`): overlap scheduler,
data-parallel attention, speculative decoding, mixed chunks, hierarchical cache, and a decode worker
without `--disaggregation-decode-enable-radix-cache`.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from ampd_plugin.connector.sglang import BACKEND_NAME
from ampd_plugin.connector.sglang.checks import local_prefill_enabled
from ampd_plugin.connector.sglang.wire import is_local_prefill_request

logger = logging.getLogger(__name__)

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
ADD_REQUEST_TARGET = f"{SCHEDULER}._add_request_to_queue"
NEXT_BATCH_TARGET = f"{SCHEDULER}.get_next_disagg_decode_batch_to_run"
IDLE_TARGET = f"{SCHEDULER}.is_fully_idle"
STATE_ATTR = "_ampd_local_prefill"


class LocalPrefillState:
    """Per-scheduler: local requests waiting for prefill and the EXTEND batch last launched for them."""

    def __init__(self) -> None:
        self.queue: List[Any] = []
        self.extend_batch: Optional[Any] = None
        self.started = 0  # requests admitted into a local prefill batch (figures / tests)


def register_hooks(registry, hook_type) -> None:
    registry.register(ADD_REQUEST_TARGET, add_request_around, hook_type.AROUND)
    registry.register(NEXT_BATCH_TARGET, next_batch_around, hook_type.AROUND)
    registry.register(IDLE_TARGET, is_fully_idle_around, hook_type.AROUND)


def state_of(scheduler) -> Optional[LocalPrefillState]:
    """The scheduler's local-prefill state, or None when this scheduler does not take local prefills."""
    state = scheduler.__dict__.get(STATE_ATTR, False)
    if state is False:
        state = LocalPrefillState() if _takes_local_prefills(scheduler) else None
        scheduler.__dict__[STATE_ATTR] = state
    return state


def _takes_local_prefills(scheduler) -> bool:
    from sglang.srt.disaggregation.utils import DisaggregationMode

    if getattr(scheduler, "disaggregation_mode", None) != DisaggregationMode.DECODE:
        return False
    backend = getattr(scheduler, "transfer_backend", None)
    return getattr(backend, "value", backend) == BACKEND_NAME and local_prefill_enabled()


def add_request_around(original, self, req, is_retracted: bool = False):
    state = state_of(self)
    if state is None or not is_local_prefill_request(getattr(req, "bootstrap_host", None)):
        return original(self, req, is_retracted)
    # The NULL-mode admission path, into our queue (a retracted local request is simply prefilled again).
    if not self._set_or_validate_priority(req):
        self._release_aborted_request(req)
        return None
    if is_retracted:
        req.storage_prefetch_retry_attempts = 0
        req.storage_prefetch_last_match_len = None
        req.staged_prefetch_plan = None
    state.queue.append(req)
    req.time_stats.set_wait_queue_entry_time()
    # Aging input of SGLang's HRRN ordering, as the NULL-mode path records it.
    req.arrival_processed_tokens = getattr(self, "processed_tokens_counter", 0)
    return None


def next_batch_around(original, self, running_batch):
    state = state_of(self)
    if state is None:
        return original(self, running_batch)
    running_batch = _fold_last_extend(self, state, running_batch)
    if state.queue or self.chunked_req is not None:
        plan, running_batch = _local_prefill_plan(self, state, running_batch)
        if plan is not None:
            return plan
    if self.chunked_req is not None:
        # A chunk is in flight but could not be scheduled now: decode only. SGLang's own step would
        # merge newly transferred requests, which it forbids while a chunk is pending.
        return _decode_only_plan(self, running_batch)
    return original(self, running_batch)


def is_fully_idle_around(original, self, *args, **kwargs):
    """Queued or half-done local prefills mean busy: idle housekeeping (leak checks) must wait."""
    idle = original(self, *args, **kwargs)
    state = state_of(self)
    if idle and state is not None and (state.queue or state.extend_batch is not None or self.chunked_req):
        return False
    return idle


def _fold_last_extend(self, state: LocalPrefillState, running_batch):
    """Stash an unfinished chunk and merge the last local EXTEND batch's requests into decoding."""
    exclude = []
    if self.chunked_req is not None:
        exclude.append(self.chunked_req)
        if self.chunked_req.extend_end > self.chunked_req.prefix_len:
            self.stash_chunked_request(self.chunked_req)
    last, state.extend_batch = state.extend_batch, None
    if last is None:
        return running_batch
    last_bs = last.batch_size()
    last.filter_batch(reqs_to_exclude=exclude)
    if last.batch_size() < last_bs:
        running_batch.batch_is_full = False
    if not last.is_empty() and last is not running_batch:
        if running_batch.is_empty():
            running_batch = last
        else:
            running_batch.merge_batch(last)
    return running_batch


def _local_prefill_plan(self, state: LocalPrefillState, running_batch):
    from sglang.srt.managers.scheduler import NextBatchPlan, set_schedule_time_batch

    # get_new_batch_prefill admits from self.waiting_queue; on a decode server that list holds transferred
    # requests waiting for their prebuilt batch, so lend it our queue for this one call.
    lent, self.waiting_queue = self.waiting_queue, state.queue
    try:
        plan = self.get_new_batch_prefill(running_batch)
    finally:
        state.queue, self.waiting_queue = self.waiting_queue, lent
    batch = plan.batch_to_run
    if batch is None:
        return None, plan.running_batch
    state.extend_batch = batch
    state.started += batch.batch_size()
    batch = self.dp_attn_adapter.maybe_prepare_mlp_sync_batch(batch)
    if batch:
        set_schedule_time_batch(batch)
    return NextBatchPlan(batch_to_run=batch, running_batch=plan.running_batch), plan.running_batch


def _decode_only_plan(self, running_batch):
    from sglang.srt.managers.scheduler import NextBatchPlan, set_schedule_time_batch

    ret = None
    if not running_batch.is_empty():
        running_batch = self.update_running_batch(running_batch)
        ret = running_batch if not running_batch.is_empty() else None
    ret = self.dp_attn_adapter.maybe_prepare_mlp_sync_batch(ret)
    if ret:
        set_schedule_time_batch(ret)
    return NextBatchPlan(batch_to_run=ret, running_batch=running_batch)
