"""The `ampd` SGLang transfer backend: SGLang's common PD classes + our Mooncake wrapper.

Everything SGLang already does well stays SGLang's: the bootstrap server (prefill ranks register, decode
ranks look them up), rank mapping, heartbeats, timeouts, abort bookkeeping and the sender/receiver
state machines (`sglang.srt.disaggregation.common.conn`). This module adds what the common classes
leave to a backend:

- the Mooncake engine (one `TransferEngineWrapper` per scheduler process) and memory registration,
- the decode → prefill messages (`messages.py`),
- the prefill-side control thread that records each request's destinations and the decode worker's
  cached prefix (`decode_prefix_len` → `req_to_decode_prefix_len`, read by SGLang's prefill scheduler
  through `CommonKVSender.pop_decode_prefix_len` so it sends only pages past the prefix),
- the transfer worker: page-indexed one-sided writes into the decode pool, then the metadata row, then
  the status message.

Supported layout: equal attention TP on both sides, pp_size 1, plain KV pools (MHA or MLA, including an
appended draft pool). Hybrid/state pools (Mamba, SWA, DSA...) are refused at construction with a clear
error — they need per-state transfers this backend does not implement.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from typing import Dict, List, Optional

import msgspec
import numpy as np
import numpy.typing as npt

from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import (
    ABORT_ACK_TAG,
    ABORT_TAG,
    AbortNotification,
    CommonKVBootstrapServer,
    CommonKVManager,
    CommonKVReceiver,
    CommonKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.server_args import ServerArgs

from ampd_plugin.connector.sglang import messages
from ampd_plugin.connector.transfer import TransferEngineWrapper, TransferError, coalesce

logger = logging.getLogger(__name__)

# Mooncake protocol: SGLang's own variable, so one setting serves both backends. Classic Mooncake builds
# pick TCP by topology when the host has no RDMA NIC whatever this says.
PROTOCOL_ENV = "MOONCAKE_PROTOCOL"
TIMEOUT_ENV = "AMPD_SGLANG_TRANSFER_TIMEOUT_S"


class RoomFailure(RuntimeError):
    """A request cannot be transferred (bad peer registration, page count mismatch...)."""


@dataclasses.dataclass
class _Chunk:
    room: int
    kv_indices: npt.NDArray[np.int32]
    index_slice: slice
    is_last_chunk: bool
    aux_index: Optional[int]
    wait_event: Optional[object] = None
    indices_event: Optional[object] = None


def _unsupported_state_reason(args: KVArgs) -> Optional[str]:
    state_types = list(getattr(args, "state_types", None) or [])
    if state_types:
        names = ", ".join(getattr(s, "value", str(s)) for s in state_types)
        return (
            f"the ampd SGLang backend moves plain KV pages only; this model's pool also has state "
            f"buffers ({names}). Use --disaggregation-transfer-backend mooncake for hybrid models."
        )
    return None


def page_addresses(base: int, item_len: int, pages: npt.ArrayLike) -> List[int]:
    """Byte address of each page of a pool buffer (SGLang pools are [pages*page_size, ...] row-major)."""
    return (np.asarray(pages, dtype=np.int64) * item_len + base).tolist()


class AmpdKVManager(CommonKVManager):
    """Per-scheduler-process transfer state for one role (prefill or decode)."""

    kv_status_msg_tag = messages.STATUS_TAG
    kv_status_msg_carries_reason = True
    reports_transfer_latency = True

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: ServerArgs,
        is_mla_backend: Optional[bool] = False,
    ):
        reason = _unsupported_state_reason(args)
        if reason:
            raise ValueError(reason)
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self.engine = TransferEngineWrapper(
            self.local_ip,
            protocol=os.environ.get(PROTOCOL_ENV, "tcp"),
            device=args.ib_device or "",
            timeout_s=float(os.environ.get(TIMEOUT_ENV, "30")),
        )
        self.engine.register(self._regions())
        # Bytes this process moved (prefill) — figures for benchmarks and the delta-only test.
        self.bytes_written = 0
        if disaggregation_mode == DisaggregationMode.PREFILL:
            # decode_kv_args_table (session -> DecodeRegistration) and transfer_infos
            # (room -> session -> RoomDestination) are created by CommonKVManager.
            self._rejected_sessions: Dict[str, str] = {}
            self._queue: "queue.Queue[Optional[_Chunk]]" = queue.Queue()
            self._start(self._prefill_control_loop, "ampd-prefill-control")
            self._start(self._transfer_loop, "ampd-transfer")
        elif disaggregation_mode == DisaggregationMode.DECODE:
            self._start(self._decode_control_loop, "ampd-decode-control")
            self._threads.append(self._start_heartbeat_checker_thread())

    # ------------------------------------------------------------------ common
    def _start(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _regions(self) -> List[tuple]:
        regions, seen = [], set()
        for ptrs, lens in (
            (self.kv_args.kv_data_ptrs, self.kv_args.kv_data_lens),
            (self.kv_args.aux_data_ptrs, self.kv_args.aux_data_lens),
        ):
            for ptr, length in zip(ptrs or [], lens or []):
                if length and (ptr, length) not in seen:  # Mooncake rejects empty/duplicate regions
                    seen.add((ptr, length))
                    regions.append((ptr, length))
        return regions

    def get_session_id(self) -> str:
        return self.engine.session

    def teardown(self) -> None:
        """Stop our threads and release Mooncake registrations (the KV pool belongs to the scheduler)."""
        self._stop.set()
        if hasattr(self, "_heartbeat_shutdown"):
            self._heartbeat_shutdown.set()
        if self.disaggregation_mode == DisaggregationMode.PREFILL:
            self._queue.put(None)
        self.engine.close()

    def _recv(self):
        """Blocking receive that wakes up twice a second so teardown can stop the thread."""
        if self.server_socket.poll(500):
            return self.server_socket.recv_multipart()
        return None

    # ------------------------------------------------------------------ decode side
    def build_receiver_registration_message(self) -> List[bytes]:
        args = self.kv_args
        return messages.encode(
            messages.DecodeRegistration(
                session=self.engine.session,
                endpoint=self.local_ip,
                port=self.rank_port,
                engine_rank=args.engine_rank,
                attn_tp_size=self.attn_tp_size,
                page_size=args.page_size,
                kv_ptrs=list(args.kv_data_ptrs),
                kv_item_lens=list(args.kv_item_lens),
                aux_ptrs=list(args.aux_data_ptrs),
                aux_item_lens=list(args.aux_item_lens),
            )
        )

    def build_receiver_metadata_message(
        self,
        *,
        bootstrap_room: int,
        required_dst_info_num: int,
        kv_indices: npt.NDArray[np.int32],
        aux_index: Optional[int],
        state_indices: Optional[List],
        decode_prefix_len: Optional[int],
        is_dummy: bool,
        device_kv_indices: Optional[npt.NDArray[np.int32]] = None,
    ) -> List[bytes]:
        if device_kv_indices is not None:
            raise NotImplementedError("the ampd SGLang backend does not support HiSparse device-only KV")
        return messages.encode(
            messages.RoomDestination(
                room=int(bootstrap_room),
                session=self.engine.session,
                endpoint=self.local_ip,
                dst_port=self.rank_port,
                required_dst_info_num=int(required_dst_info_num),
                decode_prefix_len=int(decode_prefix_len or 0),
                is_dummy=bool(is_dummy),
                kv_pages=[] if is_dummy else np.asarray(kv_indices, dtype=np.int64).tolist(),
                aux_index=None if is_dummy or aux_index is None else int(aux_index),
            )
        )

    def _decode_control_loop(self) -> None:
        while not self._stop.is_set():
            frames = self._recv()
            if frames is None:
                continue
            if frames and frames[0] == ABORT_ACK_TAG:
                self.handle_abort_ack_message(frames)
                continue
            parsed = self.parse_kv_status_message(frames)
            if parsed is None:
                continue
            room, status, prefill_rank, reason = parsed
            self.apply_prefill_status(
                bootstrap_room=room, status=status, prefill_rank=prefill_rank, failure_reason=reason
            )

    # ------------------------------------------------------------------ prefill side
    def _prefill_control_loop(self) -> None:
        while not self._stop.is_set():
            frames = self._recv()
            if frames is None:
                continue
            if frames and frames[0] == ABORT_TAG:
                self._on_abort(frames)
                continue
            try:
                msg = messages.decode(frames)
            except msgspec.DecodeError as exc:
                logger.warning("ampd: dropping malformed decode message: %s", exc)
                continue
            if msg is None:
                logger.warning("ampd: dropping unknown decode message (tag %r)", frames[:1])
            elif isinstance(msg, messages.DecodeRegistration):
                self._on_registration(msg)
            else:
                self._on_destination(msg)

    def _on_registration(self, reg: messages.DecodeRegistration) -> None:
        problem = None
        if reg.attn_tp_size != self.attn_tp_size:
            problem = (
                f"attention TP differs (prefill {self.attn_tp_size}, decode {reg.attn_tp_size}); "
                "the ampd backend needs equal TP on both roles"
            )
        elif reg.page_size != self.kv_args.page_size:
            problem = f"page size differs (prefill {self.kv_args.page_size}, decode {reg.page_size})"
        elif list(reg.kv_item_lens) != list(self.kv_args.kv_item_lens):
            problem = (
                f"KV pool layout differs (prefill page bytes {list(self.kv_args.kv_item_lens)}, "
                f"decode {list(reg.kv_item_lens)}): same model, dtype and TP are required"
            )
        if problem:
            logger.error("ampd: rejecting decode rank %s: %s", reg.session, problem)
            self._rejected_sessions[reg.session] = f"decode rank {reg.session} rejected: {problem}"
        else:
            self._rejected_sessions.pop(reg.session, None)
            self.decode_kv_args_table[reg.session] = reg

    def _on_destination(self, dst: messages.RoomDestination) -> None:
        infos = self.transfer_infos.setdefault(dst.room, {})
        infos[dst.session] = dst
        if len(infos) == dst.required_dst_info_num:
            self.resolve_kv_replica_factor(infos)
            self.req_to_decode_prefix_len[dst.room] = max(
                (i.decode_prefix_len for i in infos.values()), default=0
            )
            self.update_status(dst.room, KVPoll.WaitingForInput)

    def _on_abort(self, frames: List[bytes]) -> None:
        note = AbortNotification.from_zmq(frames)
        if note is None:
            return
        if note.room in self.request_status and self.check_status(note.room) != KVPoll.Success:
            self.record_failure(note.room, "Aborted by the decode worker")
            self.update_status(note.room, KVPoll.Failed)

    def add_transfer_request(
        self,
        bootstrap_room: int,
        kv_indices: npt.NDArray[np.int32],
        index_slice: slice,
        is_last_chunk: bool,
        aux_index: Optional[int] = None,
        state_indices: Optional[List] = None,
        num_kv_tokens: Optional[int] = None,
        *,
        wait_event: Optional[object] = None,
        indices_event: Optional[object] = None,
        trace_ctx: Optional[object] = None,
    ) -> None:
        if bootstrap_room not in self.request_status or self.check_status(bootstrap_room) == KVPoll.Failed:
            return
        if bootstrap_room not in self.transfer_infos:
            return  # this rank is a dummy participant for the request
        self._queue.put(
            _Chunk(bootstrap_room, kv_indices, index_slice, is_last_chunk, aux_index, wait_event, indices_event)
        )

    def _transfer_loop(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None or self._stop.is_set():
                return
            try:
                self._transfer_chunk(chunk)
            except (TransferError, RoomFailure) as exc:
                logger.warning("ampd: transfer of room %s failed: %s", chunk.room, exc)
                self.conclude_failure(bootstrap_room=chunk.room, failure_reason=str(exc))
            except Exception as exc:  # never let one request kill the worker thread
                logger.exception("ampd: unexpected error transferring room %s", chunk.room)
                self.conclude_failure(bootstrap_room=chunk.room, failure_reason=f"internal error: {exc!r}")

    def _transfer_chunk(self, chunk: _Chunk) -> None:
        # Overlap scheduling may hand us indices before the forward that fills them has finished.
        for event in (chunk.wait_event, chunk.indices_event):
            if event is not None:
                event.synchronize()
        room = chunk.room
        if room not in self.request_status or self.check_status(room) == KVPoll.Failed:
            return
        src_pages = chunk.kv_indices
        if hasattr(src_pages, "numpy"):
            src_pages = src_pages.numpy()
        src_pages = np.asarray(src_pages, dtype=np.int64)
        for dst in list(self.transfer_infos.get(room, {}).values()):
            if dst.is_dummy:
                continue
            reg = self._registration_for(dst.session)
            dst_pages = np.asarray(dst.kv_pages, dtype=np.int64)[chunk.index_slice]
            if len(dst_pages) < len(src_pages):
                raise RoomFailure(
                    f"decode rank {dst.session} announced {len(dst.kv_pages)} pages for room {room}, "
                    f"prefill sends pages {chunk.index_slice.start}..{chunk.index_slice.start + len(src_pages)}"
                )
            self._write_pages(dst.session, src_pages, dst_pages[: len(src_pages)], reg)
            if chunk.is_last_chunk and chunk.aux_index is not None and dst.aux_index is not None:
                self._write_aux_row(dst.session, chunk.aux_index, dst.aux_index, reg)
        if chunk.is_last_chunk:
            self.conclude_transfer(bootstrap_room=room, status=KVPoll.Success)
        else:
            self.update_status(room, KVPoll.Transferring)

    def _registration_for(self, session: str) -> messages.DecodeRegistration:
        if session in self._rejected_sessions:
            raise RoomFailure(self._rejected_sessions[session])
        reg = self.decode_kv_args_table.get(session)
        if reg is None:
            raise RoomFailure(f"decode rank {session} never registered its KV buffers")
        return reg

    def _write_pages(self, session, src_pages, dst_pages, reg: messages.DecodeRegistration) -> None:
        if len(src_pages) == 0:
            return
        local, remote, lengths = [], [], []
        for src_ptr, dst_ptr, item_len in zip(self.kv_args.kv_data_ptrs, reg.kv_ptrs, self.kv_args.kv_item_lens):
            if not item_len:
                continue
            runs = coalesce(
                page_addresses(src_ptr, item_len, src_pages), page_addresses(dst_ptr, item_len, dst_pages), item_len
            )
            for lo, re, n in runs:
                local.append(lo)
                remote.append(re)
                lengths.append(n)
        self.bytes_written += self.engine.write(session, local, remote, lengths)

    def _write_aux_row(self, session, src_row: int, dst_row: int, reg: messages.DecodeRegistration) -> None:
        # Metadata rows pair up positionally; a peer with fewer buffers gets the leading ones.
        pairs = list(zip(self.kv_args.aux_data_ptrs, reg.aux_ptrs, self.kv_args.aux_item_lens))
        self.check_peer_aux_buffer_count(session, len(reg.aux_ptrs))
        local = [src + item * src_row for src, _, item in pairs]
        remote = [dst + item * dst_row for _, dst, item in pairs]
        self.bytes_written += self.engine.write(session, local, remote, [item for _, _, item in pairs])


class AmpdKVSender(CommonKVSender):
    """SGLang's common sender; `pop_decode_prefix_len` reads what our control thread recorded."""


class AmpdKVReceiver(CommonKVReceiver):
    """SGLang's common receiver; its messages are built by `AmpdKVManager`."""


class AmpdKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's bootstrap server as is (prefill ranks register, decode ranks look them up)."""
