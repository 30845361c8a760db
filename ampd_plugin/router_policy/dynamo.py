"""NVIDIA Dynamo's conditional disaggregation, as a policy of this project (the `dynamo` baseline).

The rule reproduced (Dynamo ≥ 1.5 frontend, `--router-conditional-disagg`, documented in "Conditional
Disaggregation" of the Dynamo docs and implemented in `lib/kv-router/src/conditional_disagg.rs` and the
prefill router's `conditional_bypass.rs`):

    eff_isl = prompt_tokens − overlap_blocks(decode worker) × block_size      # net-new prefill on D
    bypass  = eff_isl < eff_isl_threshold  AND  eff_isl / prompt_tokens < eff_isl_ratio_threshold
              (policy "isl", Dynamo's IslBounding, the default; defaults 2048 tokens and 0.7)
            OR the chosen prefill worker is busy                                   (policy "isl_or_load")
    then vetoed when the decode worker is busy:
              projected decode blocks > decode_busy_threshold × total KV blocks

A bypassed request runs prefill and decode on the decode worker ("local" here); otherwise the prefill
runs on the prefill worker the KV router picks (prefix overlap against load) and its KV goes to the
decode worker. Decode routing keeps session affinity (Dynamo's `session_affinity_ttl`): a session stays
on the decode worker that holds its history (the binding here), chosen at its first round by KV load.

Mapping to the signals every policy here gets: the decode worker's overlap is the history it holds,
`task.l_hist`, rounded down to whole KV blocks (`block_size`; vLLM's CPU backend uses 128, GPU 16);
"prefill worker busy" — Dynamo's `active_tokens > threshold` — is the tokens queued or running on the
prefill worker above `prefill_busy_tokens`; the decode-busy gate uses `kv_used_tokens` and
`kv_capacity_tokens`. Dynamo leaves the decode gate off unless configured; 0 disables it here too.
"""

from __future__ import annotations

from typing import Any

from ampd_plugin.router_policy.base import BasePolicy
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route, WorkerState

POLICIES = ("isl", "isl_or_load")


def overlap_tokens(l_hist: int, block_size: int) -> int:
    """The part of a history a prefix cache can reuse: whole blocks only."""
    return (max(0, l_hist) // block_size) * block_size


class DynamoPolicy(BasePolicy):
    """Parameters: `eff_isl_threshold` (2048), `eff_isl_ratio_threshold` (0.7), `policy` ("isl" or
    "isl_or_load"), `prefill_busy_tokens` (4096, only for "isl_or_load"), `decode_busy_threshold`
    (fraction of KV blocks; 0.9, 0 = off), `block_size` (16), plus the BasePolicy ones."""

    def __init__(
        self,
        cost_model: Any,
        *,
        eff_isl_threshold: int = 2048,
        eff_isl_ratio_threshold: float = 0.7,
        policy: str = "isl",
        prefill_busy_tokens: int = 4096,
        decode_busy_threshold: float = 0.9,
        block_size: int = 16,
        **base: Any,
    ) -> None:
        super().__init__(cost_model, **base)
        if int(eff_isl_threshold) < 0:
            raise ValueError(f"eff_isl_threshold must be >= 0, got {eff_isl_threshold}")
        if not 0 < float(eff_isl_ratio_threshold) <= 1:
            raise ValueError(f"eff_isl_ratio_threshold must be in (0, 1], got {eff_isl_ratio_threshold}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if int(prefill_busy_tokens) < 0:
            raise ValueError(f"prefill_busy_tokens must be >= 0, got {prefill_busy_tokens}")
        if float(decode_busy_threshold) < 0:
            raise ValueError(f"decode_busy_threshold must be >= 0, got {decode_busy_threshold}")
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.eff_isl_threshold = int(eff_isl_threshold)
        self.eff_isl_ratio_threshold = float(eff_isl_ratio_threshold)
        self.policy = policy
        self.prefill_busy_tokens = int(prefill_busy_tokens)
        self.decode_busy_threshold = float(decode_busy_threshold)
        self.block_size = int(block_size)

    def isl_says_local(self, task: PrefillTask) -> bool:
        """Dynamo's IslBounding predicate (strict inequalities, like the original)."""
        prompt = task.l_hist + task.l_incr
        eff_isl = prompt - overlap_tokens(task.l_hist, self.block_size)
        return eff_isl < self.eff_isl_threshold and eff_isl / max(prompt, 1) < self.eff_isl_ratio_threshold

    def prefill_busy(self, worker: WorkerState | None) -> bool:
        """Dynamo's prefill-busy line: tokens in flight on the worker above the threshold."""
        if worker is None:
            return False
        in_flight = ([worker.running] if worker.running is not None else []) + worker.queue
        return sum(t.l_incr for t in in_flight) > self.prefill_busy_tokens

    def decode_busy(self, task: PrefillTask, d: WorkerState) -> bool:
        """Dynamo's decode gate: the decode worker's projected KV use (with this round) over the line."""
        if self.decode_busy_threshold <= 0 or d.kv_capacity_tokens <= 0:
            return False  # gate off, or the capacity is unknown (Dynamo: signal unavailable → no veto)
        projected = d.kv_used_tokens + task.l_incr
        return projected > self.decode_busy_threshold * d.kv_capacity_tokens

    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        d = cluster.decode[task.decode_worker]
        target = self.cache_aware_prefill(task, cluster, cluster.now)
        if target is None:
            return Route("local", d.worker_id, "no-live-prefill-worker")
        bypass = self.isl_says_local(task)
        reason = "eff-isl-short"
        if not bypass and self.policy == "isl_or_load" and self.prefill_busy(target):
            bypass, reason = True, "prefill-busy"
        if bypass and not self.decode_busy(task, d):
            return Route("local", d.worker_id, reason)
        return Route("remote", target.worker_id, "decode-busy" if bypass else "eff-isl-long")
