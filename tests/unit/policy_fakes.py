"""A tiny linear cost model and cluster builders for policy and simulator unit tests.

It follows the `ampd_plugin.costmodel` contract with round numbers, so expected values can be computed
by hand in the tests.
"""

from __future__ import annotations

from ampd_plugin.costmodel import Layout
from ampd_plugin.router_policy.state import DECODE, PREFILL, ClusterState, WorkerState


class FakeCost:
    kv_bytes_per_token = 1000

    def __init__(self, pre_per_token=0.001, hist_per_token=0.0001, step=0.02, ctx_per_token=0.0,
                 kv_per_token=0.00001, capacity=100_000):
        self.pre_per_token = pre_per_token
        self.hist_per_token = hist_per_token
        self.step = step
        self.ctx_per_token = ctx_per_token
        self.kv_per_token = kv_per_token
        self.capacity = capacity

    def t_pre(self, l_hist, l_incr, layout):
        return (self.pre_per_token * l_incr + self.hist_per_token * l_hist) / layout.tp

    def t_dec(self, batch, context_tokens, layout):
        return self.step + self.ctx_per_token * context_tokens

    def t_kv(self, tokens, src, dst, link="net"):
        return 0.0 if link == "local" else self.kv_per_token * tokens

    def kv_capacity_tokens(self, layout):
        return self.capacity * layout.tp


def cluster(n_prefill=2, n_decode=2, tp=1, capacity=100_000):
    c = ClusterState()
    for i in range(n_prefill):
        c.add_worker(WorkerState(f"p{i}", PREFILL, Layout(tp)))
    for i in range(n_decode):
        c.add_worker(WorkerState(f"d{i}", DECODE, Layout(tp), kv_capacity_tokens=capacity))
    return c
