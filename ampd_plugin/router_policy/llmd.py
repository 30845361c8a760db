"""llm-d's prefix-based P/D decider, as a policy of this project (the `llmd` baseline).

The rule reproduced (llm-d inference scheduler, plugin `prefix-based-pd-decider`, `nonCachedTokens`
parameter; `pkg/plugins/profile/prefix_based_pd_decider.go`): the scheduler first picks the decode pod
(its prefix-cache scorer keeps a conversation on the pod that caches it), then

    disaggregate = nonCachedTokens > 0  AND  prompt_tokens − prefix_match(decode pod) ≥ nonCachedTokens

i.e. the prefill pod is skipped when the non-cached suffix is short; otherwise the prefill profile picks a
prefill pod (prefix-cache scorer against load) and the decode pod's sidecar pulls the KV from it. With
`nonCachedTokens` = 0 (the plugin's default) it never disaggregates; the llm-d guides set a positive
value — the default here is 128, the value in llm-d's P/D troubleshooting example.

Mapping: the decode pod's prefix match is the history the bound decode worker holds, `task.l_hist`,
rounded down to whole blocks (`block_size`); the binding gives the session affinity.
"""

from __future__ import annotations

from typing import Any

from ampd_plugin.router_policy.base import BasePolicy
from ampd_plugin.router_policy.dynamo import overlap_tokens
from ampd_plugin.router_policy.spec import hookimpl
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, Route


class LlmdPolicy(BasePolicy):
    """Parameters: `non_cached_tokens` (128; 0 = never disaggregate), `block_size` (16), plus BasePolicy's."""

    def __init__(self, cost_model: Any, *, non_cached_tokens: int = 128, block_size: int = 16, **base: Any) -> None:
        super().__init__(cost_model, **base)
        if int(non_cached_tokens) < 0:
            raise ValueError(f"non_cached_tokens must be >= 0, got {non_cached_tokens}")
        if int(block_size) < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.non_cached_tokens = int(non_cached_tokens)
        self.block_size = int(block_size)

    def disaggregate(self, task: PrefillTask) -> bool:
        if self.non_cached_tokens <= 0:
            return False
        prompt = task.l_hist + task.l_incr
        return prompt - overlap_tokens(task.l_hist, self.block_size) >= self.non_cached_tokens

    @hookimpl
    def route_prefill(self, task: PrefillTask, cluster: ClusterState) -> Route:
        if not self.disaggregate(task):
            return Route("local", task.decode_worker, "non-cached-short")
        target = self.cache_aware_prefill(task, cluster, cluster.now)
        if target is None:
            return Route("local", task.decode_worker, "no-live-prefill-worker")
        return Route("remote", target.worker_id, "non-cached-long")
