"""Decode → prefill control messages of the `ampd` SGLang backend (ZMQ multipart: [tag, msgpack]).

SGLang's common receiver sends two things to every prefill rank it pairs with: once, a *registration*
(where this decode rank's KV pages and metadata rows live, and its Mooncake session), and per request a
*destination* (which decode pages receive this request's KV, which metadata row, and how many prompt
tokens the decode worker already holds — `decode_prefix_len`, so only the rest is moved). Prefill →
decode status uses SGLang's own tagged status message (`CommonKVManager.send_kv_status_message`).

Typed msgspec structs instead of positional frames: a malformed or foreign message fails to decode and
is dropped with a log line, never half-parsed.
"""

from __future__ import annotations

from typing import List, Optional

import msgspec

REGISTER_TAG = b"AMPD_REG"
DESTINATION_TAG = b"AMPD_DST"
STATUS_TAG = b"AMPD_STATUS"


class DecodeRegistration(msgspec.Struct, frozen=True):
    """One decode rank's transferable memory (sent once per prefill rank it talks to)."""

    session: str  # Mooncake session of the decode rank, "host:rpc_port"
    endpoint: str  # decode rank's control socket (status messages go there)
    port: int
    engine_rank: int
    attn_tp_size: int
    page_size: int
    kv_ptrs: List[int]
    kv_item_lens: List[int]  # bytes of one page in each KV buffer
    aux_ptrs: List[int]
    aux_item_lens: List[int]  # bytes of one metadata row in each aux buffer


class RoomDestination(msgspec.Struct, frozen=True):
    """Where one request's KV goes on one decode rank.

    `kv_pages` lists decode pages for the prompt *beyond* `decode_prefix_len` (SGLang's decode side
    only allocates and announces the delta), in order; the prefill sender sends the same count.
    """

    room: int
    session: str
    endpoint: str  # decode rank's control socket (field names match SGLang's TransferInfo,
    dst_port: int  # which CommonKVManager reads when it notifies a room's decode ranks)
    required_dst_info_num: int
    decode_prefix_len: int = 0
    is_dummy: bool = False
    kv_pages: List[int] = []
    aux_index: Optional[int] = None


_encoder = msgspec.msgpack.Encoder()
_decoders = {
    REGISTER_TAG: msgspec.msgpack.Decoder(DecodeRegistration),
    DESTINATION_TAG: msgspec.msgpack.Decoder(RoomDestination),
}


def encode(message: DecodeRegistration | RoomDestination) -> List[bytes]:
    tag = REGISTER_TAG if isinstance(message, DecodeRegistration) else DESTINATION_TAG
    return [tag, _encoder.encode(message)]


def decode(frames: List[bytes]) -> DecodeRegistration | RoomDestination | None:
    """The message in `frames`, or None when they are not an ampd registration/destination."""
    if len(frames) != 2 or frames[0] not in _decoders:
        return None
    return _decoders[frames[0]].decode(frames[1])
