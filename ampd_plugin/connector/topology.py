"""Which holder ranks and KV-head slices each reader rank reads when the two sides run different TP.

Pure arithmetic, shared by the scheduler (can this source be read at all? if not, compute locally) and by
each worker rank (what exactly do I read?). vLLM shards a layer's KV heads over the tensor-parallel ranks:

- TP <= heads: rank ``r`` holds heads ``[r*h, (r+1)*h)`` with ``h = heads / TP`` (TP must divide heads);
- TP > heads (replicated KV): rank ``r`` holds the single head ``r // (TP / heads)`` (heads must divide TP).

A reader rank needs exactly the heads it holds itself, so: reader TP > holder TP → each reader rank reads
its slice from holder rank ``r // ratio``; holder TP > reader TP → a reader rank reads whole blocks from
``ratio`` holder ranks, one slice each; replicated KV → any replica will do (we spread readers over them).
"""

from __future__ import annotations

import dataclasses


class TopologyError(ValueError):
    """The two layouts cannot be mapped onto each other; the text says what would work."""


@dataclasses.dataclass(frozen=True)
class HeadSlice:
    """Copy ``count`` KV heads from ``holder_rank``'s local head ``holder_head`` to our local ``reader_head``."""

    holder_rank: int
    holder_head: int
    reader_head: int
    count: int


def check_tp(tp: int, kv_heads: int, side: str = "") -> None:
    """Raise `TopologyError` unless vLLM could shard ``kv_heads`` KV heads over ``tp`` ranks."""
    who = f"{side} " if side else ""
    if tp < 1 or kv_heads < 1:
        raise TopologyError(f"{who}tensor-parallel size {tp} and KV-head count {kv_heads} must be >= 1")
    if tp <= kv_heads and kv_heads % tp:
        raise TopologyError(f"{who}TP {tp} does not divide the {kv_heads} KV heads; use a TP that divides "
                            f"{kv_heads} (or a multiple of it)")
    if tp > kv_heads and tp % kv_heads:
        raise TopologyError(f"{who}TP {tp} is not a multiple of the {kv_heads} KV heads (replicated KV needs "
                            f"one); use a TP that divides {kv_heads} or a multiple of it")


def heads_of_rank(tp: int, rank: int, kv_heads: int) -> tuple[int, int]:
    """(first global KV head, number of heads) that ``rank`` of a ``tp``-way engine holds."""
    check_tp(tp, kv_heads)
    if not 0 <= rank < tp:
        raise TopologyError(f"rank {rank} out of range for TP {tp}")
    if tp <= kv_heads:
        per = kv_heads // tp
        return rank * per, per
    return rank // (tp // kv_heads), 1


def local_heads(tp: int, kv_heads: int) -> int:
    """KV heads each rank of a ``tp``-way engine holds."""
    check_tp(tp, kv_heads)
    return max(1, kv_heads // tp)


def _holder_of(head: int, holder_tp: int, kv_heads: int, reader_rank: int) -> tuple[int, int]:
    """(holder rank, its local head index) for global ``head``; replicas are spread over reader ranks."""
    if holder_tp <= kv_heads:
        per = kv_heads // holder_tp
        return head // per, head % per
    rep = holder_tp // kv_heads
    return head * rep + reader_rank % rep, 0


def plan_rank(holder_tp: int, reader_tp: int, kv_heads: int, reader_rank: int) -> list[HeadSlice]:
    """The slices reader rank ``reader_rank`` copies, adjacent heads of one holder rank merged."""
    check_tp(holder_tp, kv_heads, "holder")
    check_tp(reader_tp, kv_heads, "reader")
    first, count = heads_of_rank(reader_tp, reader_rank, kv_heads)
    out: list[HeadSlice] = []
    for i in range(count):
        rank, head = _holder_of(first + i, holder_tp, kv_heads, reader_rank)
        last = out[-1] if out else None
        if last and last.holder_rank == rank and last.holder_head + last.count == head:
            out[-1] = dataclasses.replace(last, count=last.count + 1)
        else:
            out.append(HeadSlice(holder_rank=rank, holder_head=head, reader_head=i, count=1))
    return out


def plan(holder_tp: int, reader_tp: int, kv_heads: int) -> list[list[HeadSlice]]:
    """`plan_rank` for every reader rank (index = reader rank)."""
    return [plan_rank(holder_tp, reader_tp, kv_heads, r) for r in range(reader_tp)]


def check_mappable(holder_tp: int, reader_tp: int, holder_heads: int, reader_heads: int) -> None:
    """Raise `TopologyError` (with what would work) unless a reader can map the holder's KV onto its own."""
    if holder_heads != reader_heads:
        raise TopologyError(f"the holder's model has {holder_heads} KV heads, this one {reader_heads}: "
                            "different models cannot share KV")
    check_tp(holder_tp, holder_heads, "holder")
    check_tp(reader_tp, reader_heads, "reader")


def check_engine(*, pp: int = 1, pcp: int = 1, dcp: int = 1, kv_groups: int = 1, attention_only: bool = True) -> None:
    """Refuse, at start-up, engine layouts the connector cannot transfer (the message says what works)."""
    if pp != 1:
        raise TopologyError(f"the ampd connector supports pipeline-parallel size 1 only (got {pp}); use "
                            "tensor parallelism (--tensor-parallel-size) or more replicas instead")
    if pcp != 1 or dcp != 1:
        raise TopologyError(f"the ampd connector does not support context parallelism (prefill {pcp}, decode "
                            f"{dcp}); run with context-parallel size 1 and tensor parallelism instead")
    if kv_groups != 1 or not attention_only:
        raise TopologyError("the ampd connector supports models whose layers all use full attention (one KV cache "
                            "group); hybrid / sliding-window / SSM (Mamba) models are not supported: serve them "
                            "without it, or with vLLM's NixlConnector")
