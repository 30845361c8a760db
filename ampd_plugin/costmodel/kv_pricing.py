"""KV-transfer pricing as the connector moves KV: per TP rank, in parallel, and per remote round by backend.

Per-rank transfers (`transfer_shape`, `parallel_transfer_seconds`). Every TP rank holds the KV of its head
slice; a reader rank reads exactly its own slice, from the holder ranks that have it, and all ranks read at
once. With H KV heads and a replica of TP T, rank t holds heads [t·H/T, (t+1)·H/T) when T ≤ H, and head
t // (T/H) when T > H (replicated KV: each head on T/H ranks). So:
- reader TP R > holder TP S: reader rank r reads from holder rank r // (R/S);
- S > R: reader rank r reads from holder ranks r·(S/R) … (r+1)·(S/R) − 1;
- a replicated holder head is read from replica (r·S // R) mod (S/H), spreading readers over the replicas;
- bytes moved = per-rank bytes × reader ranks (R > H moves more than one copy of the KV).
The time is the fixed latency plus the slowest link: max over reader ranks (ingress) and holder ranks
(egress) of its bytes / the per-rank bandwidth, and — when a host has fewer NICs than GPUs — max over hosts
of their bytes / (NICs × per-NIC bandwidth). Both cost models (roofline and fitted) price `t_kv` with it,
so the router, the simulator and the planner agree.

Per remote round (`remote_round`, `remote_round_seconds`), by the backend of the layouts (`Layout.backend`):
- vLLM `ampd`: P reads the history it lacks from D, computes the increment, D reads the increment:
  t_pre(l_hist, l_incr) + t_kv(l_hist − c_P, D→P) + t_kv(l_incr, P→D);
- SGLang `ampd`: P never reads history; it recomputes what its own prefix cache lacks, then writes D the
  pages past D's cached prefix (the increment): t_pre(c_P, l_hist + l_incr − c_P) + t_kv(l_incr, P→D).
c_P is the session's prefix cached on P (the router's locality table).

`LinkPricing` wraps any cost model so that its default link ("net", what the simulator asks for) returns
the expected cost under a placement's intra-/cross-node mix, and so that `--link-bw` / `--net-bw` replace
the preset's bandwidths (per rank, with the same per-rank arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ampd_plugin.costmodel.layout import Layout, layout_refusal

TRANSFER_LATENCY_S = 200e-6  # fixed cost per transfer when a bandwidth is overridden (as the roofline)


def rank_heads(num_kv_heads: int, tp: int) -> list[tuple[int, ...]]:
    """The KV heads each TP rank holds (ValueError, with what would work, for an unmappable TP)."""
    why = layout_refusal(num_kv_heads, Layout(tp=tp))
    if why:
        raise ValueError(why)
    h = int(num_kv_heads)
    if tp <= h:
        per = h // tp
        return [tuple(range(t * per, (t + 1) * per)) for t in range(tp)]
    rep = tp // h
    return [(t // rep,) for t in range(tp)]


@dataclass(frozen=True)
class TransferShape:
    """Who reads what: `reads` are (reader rank, holder rank, heads) triples of one transfer."""

    num_kv_heads: int
    src_tp: int
    dst_tp: int
    reads: tuple[tuple[int, int, int], ...]

    def reader_heads(self) -> list[int]:
        out = [0] * self.dst_tp
        for r, _s, n in self.reads:
            out[r] += n
        return out

    def holder_heads(self) -> list[int]:
        out = [0] * self.src_tp
        for _r, s, n in self.reads:
            out[s] += n
        return out

    @property
    def heads_moved(self) -> int:
        """Head-copies moved in total (= per-rank heads × reader ranks; > H when the reader replicates)."""
        return sum(n for _r, _s, n in self.reads)


def transfer_shape(num_kv_heads: int | None, src_tp: int, dst_tp: int) -> TransferShape:
    """The per-rank reads of a transfer from a TP-`src_tp` holder to a TP-`dst_tp` reader.

    `num_kv_heads=None` (a fitted profile that does not know the model) assumes heads that split evenly on
    both sides (lcm of the two degrees), i.e. no replication.
    """
    s, r = int(src_tp), int(dst_tp)
    if s % r and r % s:
        raise ValueError(f"holder TP={s}, reader TP={r}: one TP degree must divide the other")
    h = int(num_kv_heads) if num_kv_heads is not None else math.lcm(s, r)
    holders = rank_heads(h, s)
    readers = rank_heads(h, r)
    where: dict[int, list[int]] = {}
    for rank, heads in enumerate(holders):
        for head in heads:
            where.setdefault(head, []).append(rank)
    reads: dict[tuple[int, int], int] = {}
    for rank, heads in enumerate(readers):
        for head in heads:
            replicas = where[head]
            holder = replicas[(rank * s // r) % len(replicas)]
            reads[(rank, holder)] = reads.get((rank, holder), 0) + 1
    return TransferShape(h, s, r, tuple((a, b, n) for (a, b), n in sorted(reads.items())))


def _host_sums(per_rank: list[float], ranks_per_host: int) -> list[float]:
    sums: dict[int, float] = {}
    for rank, value in enumerate(per_rank):
        sums[rank // ranks_per_host] = sums.get(rank // ranks_per_host, 0.0) + value
    return list(sums.values())


def parallel_transfer_seconds(tokens: int, kv_bytes_per_token: int, num_kv_heads: int | None, src: Layout,
                              dst: Layout, rank_bytes_per_s: float, latency_s: float,
                              nics_per_host: int | None = None, ranks_per_host: int | None = None) -> float:
    """Seconds to move `tokens` tokens of KV from `src` to `dst`, every rank reading its slice in parallel.

    `rank_bytes_per_s` is one rank's link (one direction). `nics_per_host`/`ranks_per_host`, when given,
    cap a host's total at `nics_per_host × rank_bytes_per_s` (ranks of one replica fill hosts in order).
    PP > 1 (not served by the connector) is priced as stages moving their layers in parallel, bounded by
    the side with fewer stages.
    """
    if tokens <= 0:
        return 0.0
    if not rank_bytes_per_s > 0:
        raise ValueError("rank bandwidth must be positive")
    shape = transfer_shape(num_kv_heads, src.tp, dst.tp)
    head_bytes = tokens * kv_bytes_per_token / shape.num_kv_heads / min(src.pp, dst.pp)
    ingress = [n * head_bytes for n in shape.reader_heads()]
    egress = [n * head_bytes for n in shape.holder_heads()]
    busiest = max(max(ingress), max(egress)) / rank_bytes_per_s
    if nics_per_host and ranks_per_host and nics_per_host < ranks_per_host:
        host_bw = nics_per_host * rank_bytes_per_s
        for side in (ingress, egress):
            busiest = max(busiest, max(_host_sums(side, ranks_per_host)) / host_bw)
    return latency_s + busiest


@dataclass(frozen=True)
class RemoteRound:
    """What one remote round moves and computes (tokens): the single definition the policy prices and the
    simulator executes."""

    read: int  # history KV the prefill worker reads from the decode worker
    start: int  # prompt tokens the prefill worker holds before computing (cached or read)
    compute: int  # prompt tokens the prefill worker computes
    ship: int  # prompt tokens whose KV goes to the decode worker


def remote_round(backend: str, prompt: int, held_on_decode: int, cached_on_prefill: int) -> RemoteRound:
    """The remote round of a `prompt`-token prompt when D holds `held_on_decode` tokens of it and P caches
    `cached_on_prefill` tokens (both clipped to the prompt).

    vLLM `ampd`: P reads from D the history it lacks, computes the rest, D reads what P computed.
    SGLang `ampd`: P reads nothing, computes all its own cache lacks, and writes D the pages past D's
    cached prefix (`decode_prefix_len`).
    """
    prompt = max(0, int(prompt))
    hist = max(0, min(int(held_on_decode), prompt))
    cached = max(0, min(int(cached_on_prefill), prompt))
    if backend == "sglang":
        return RemoteRound(0, cached, prompt - cached, prompt - hist)
    start = max(hist, cached)
    return RemoteRound(max(0, hist - cached), start, prompt - start, prompt - start)


def remote_round_seconds(l_hist: int, l_incr: int, cached_on_prefill: int, prefill: Layout, decode: Layout,
                         t_pre: Callable[[int, int, Layout], float],
                         t_kv: Callable[[int, Layout, Layout], float]) -> float:
    """Service time (no queueing) of a remote round as the prefill layout's backend runs it, with D holding
    the `l_hist` history:

    vLLM: t_pre(l_hist, l_incr) + t_kv(l_hist − c_P, D→P) + t_kv(l_incr, P→D);
    SGLang: t_pre(c_P, l_hist + l_incr − c_P) + t_kv(l_incr, P→D) (history recomputed, never read).
    `t_pre`/`t_kv` are a cost model's methods (or a policy's cached versions of them).
    """
    rnd = remote_round(prefill.backend, l_hist + l_incr, l_hist, cached_on_prefill)
    total = t_pre(rnd.start, rnd.compute, prefill)
    if rnd.read:
        total += t_kv(rnd.read, decode, prefill)
    if rnd.ship:
        total += t_kv(rnd.ship, prefill, decode)
    return total


class LinkPricing:
    """Delegates everything to `base`; re-prices `t_kv`."""

    def __init__(self, base, intra_node_fraction: float | None = None,
                 link_gbps: float | None = None, net_gbps: float | None = None):
        for name, v in (("--link-bw", link_gbps), ("--net-bw", net_gbps)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive GB/s, got {v}")
        if intra_node_fraction is not None and not 0.0 <= intra_node_fraction <= 1.0:
            raise ValueError("intra_node_fraction must be in [0, 1]")
        self.base = base
        self.intra_node_fraction = intra_node_fraction
        self.bandwidth = {"nvlink": link_gbps, "net": net_gbps}

    def __getattr__(self, name):  # t_pre, t_dec, kv_capacity_tokens, kv_bytes_per_token, ...
        return getattr(self.base, name)

    def _one(self, tokens: int, src: Layout, dst: Layout, link: str) -> float:
        gbps = self.bandwidth.get(link)
        if gbps is None or link == "local" or tokens <= 0:
            return self.base.t_kv(tokens, src, dst, link)
        heads = getattr(self.base, "num_key_value_heads", None)
        return parallel_transfer_seconds(tokens, self.base.kv_bytes_per_token, heads, src, dst, gbps * 1e9,
                                         TRANSFER_LATENCY_S)

    def t_kv(self, tokens: int, src: Layout, dst: Layout, link: str = "net") -> float:
        f = self.intra_node_fraction
        if link != "net" or f is None:
            return self._one(tokens, src, dst, link)
        fast = self._one(tokens, src, dst, "nvlink") if f > 0 else 0.0
        slow = self._one(tokens, src, dst, "net") if f < 1 else 0.0
        return f * fast + (1.0 - f) * slow
