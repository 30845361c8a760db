"""Messages between the halves of the `ampd` connector, and the block arithmetic they rely on.

Scheduler → worker: `AMPDConnectorMetadata` (loads to start this step). Worker → scheduler at start-up:
`AMPDHandshake` (where this worker rank's KV memory is and its Mooncake session; one per TP rank). The helpers below are pure
so unit tests cover them without an engine.
"""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from ampd_plugin.connector.params import SourceDescriptor


@dataclasses.dataclass
class AMPDHandshake(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler once its KV cache is registered."""

    te_session: str               # Mooncake "host:rpc_port" of this rank's own transfer engine
    bases: tuple[int, ...]        # per-layer base address, layer order
    block_bytes: int              # bytes of one block in one layer (this rank's heads)
    num_blocks: int
    tp_rank: int = 0
    tp_size: int = 1
    kv_heads: int = 0             # the model's KV heads (all ranks); 0 = unknown
    head_bytes: int = 0           # bytes of one KV head of one block in one layer


@dataclasses.dataclass
class LoadSpec:
    """Read ``remote_blocks`` of ``source`` into our ``local_blocks`` (same positions)."""

    req_id: str
    source: SourceDescriptor
    local_blocks: list[int]
    remote_blocks: list[int]
    error: str | None = None      # set when the scheduler could not plan the read: the worker fails it
    lease_deadline: float | None = None  # monotonic time the source's lease is known to hold until (leases.py)


@dataclasses.dataclass
class AMPDConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)


def history_blocks(history_tokens: int, prompt_len: int, block_size: int) -> int:
    """Whole blocks of a session's history worth reading from its holder.

    The holder has valid KV for ``history_tokens - 1`` positions (the last sampled token was never fed
    back) and only whole blocks are in its prefix cache; the reader must still compute ≥ 1 prompt token.
    """
    usable = min(history_tokens - 1, prompt_len - 1)
    return max(0, usable // block_size)


def external_tokens(source_tokens: int, prompt_len: int, local_hit: int, block_size: int,
                    whole_blocks_only: bool) -> int:
    """Tokens to load beyond the (block-aligned) local hit; 0 = nothing worth loading."""
    end = min(source_tokens, prompt_len)
    if whole_blocks_only:
        end -= end % block_size
    return max(0, end - local_hit)


def block_span(start_token: int, num_tokens: int, block_size: int) -> range:
    """Indexes of the blocks that hold positions ``[start_token, start_token + num_tokens)``."""
    if num_tokens <= 0:
        return range(0)
    first = start_token // block_size
    last = (start_token + num_tokens - 1) // block_size
    return range(first, last + 1)


def read_descriptors(local_blocks: list[int], remote_blocks: list[int], local_bases: tuple[int, ...],
                     remote_bases: tuple[int, ...], block_bytes: int) -> tuple[list[int], list[int], list[int]]:
    """(local addrs, remote addrs, lengths) for every layer and block, contiguous runs merged."""
    from ampd_plugin.connector.transfer import coalesce

    if len(local_bases) != len(remote_bases):
        raise ValueError(f"layer count differs: local {len(local_bases)} vs remote {len(remote_bases)}")
    if len(local_blocks) != len(remote_blocks):
        raise ValueError("local and remote block lists differ in length")
    lo_all: list[int] = []
    re_all: list[int] = []
    ln_all: list[int] = []
    for lb, rb in zip(local_bases, remote_bases):
        runs = coalesce([lb + b * block_bytes for b in local_blocks],
                        [rb + b * block_bytes for b in remote_blocks], block_bytes)
        for lo, re, n in runs:
            lo_all.append(lo)
            re_all.append(re)
            ln_all.append(n)
    return lo_all, re_all, ln_all


def slice_descriptors(local_blocks: list[int], remote_blocks: list[int], local_bases: tuple[int, ...],
                      remote_bases: tuple[int, ...], local_block_bytes: int, remote_block_bytes: int,
                      head_bytes: int, slices) -> tuple[list[int], list[int], list[int]]:
    """(local addrs, remote addrs, lengths) copying head ``slices`` (`topology.HeadSlice`, all of one holder
    rank) of every layer and block; runs contiguous on both sides are merged (a same-TP read of whole blocks
    collapses to what `read_descriptors` gives)."""
    if len(local_bases) != len(remote_bases):
        raise ValueError(f"layer count differs: local {len(local_bases)} vs remote {len(remote_bases)}")
    if len(local_blocks) != len(remote_blocks):
        raise ValueError("local and remote block lists differ in length")
    lo_all: list[int] = []
    re_all: list[int] = []
    ln_all: list[int] = []
    for lb, rb in zip(local_bases, remote_bases):
        for lblk, rblk in zip(local_blocks, remote_blocks):
            for s in slices:
                lo = lb + lblk * local_block_bytes + s.reader_head * head_bytes
                re = rb + rblk * remote_block_bytes + s.holder_head * head_bytes
                n = s.count * head_bytes
                if ln_all and lo_all[-1] + ln_all[-1] == lo and re_all[-1] + ln_all[-1] == re:
                    ln_all[-1] += n
                else:
                    lo_all.append(lo)
                    re_all.append(re)
                    ln_all.append(n)
    return lo_all, re_all, ln_all
