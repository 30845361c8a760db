"""One side of a real SGLang PD transfer, driven over stdin/stdout JSON lines by tests/sglang tests.

    python tests/sglang/pd_peer.py {prefill|decode} BOOTSTRAP_PORT MODEL_DIR

What is real: SGLang's plugin loading (our entry point), its argument parser and resolution (our start-up
check runs as a hook), its runtime-context publish, its bootstrap service (`start_disagg_service` on
prefill), SGLang's KV pool and metadata buffers allocated on CPU (`MHATokenToKVPool`, `MetadataBuffers`),
SGLang's backend lookup (`get_kv_class`) returning our classes, and Mooncake moving the bytes. What a
scheduler would do around them (pick pages, call init/send/poll) is done by the commands below, in the
order SGLang's prefill bootstrap queue and decode pre-allocation queue do it.
"""

from __future__ import annotations

import json
import os
import sys
import time

PAGE_SIZE = 4
POOL_TOKENS = 256
LAYERS = 2
HEADS = 2
HEAD_DIM = 16
META_ROWS = 16
POLL_TIMEOUT_S = 30.0


def _server_args(role: str, bootstrap_port: int, model_dir: str):
    from sglang.srt.server_args import prepare_server_args

    argv = [
        "--model-path", model_dir, "--skip-tokenizer-init", "--device", "cpu", "--host", "127.0.0.1",
        "--disaggregation-mode", role, "--disaggregation-transfer-backend", "ampd",
        "--disaggregation-bootstrap-port", str(bootstrap_port), "--page-size", str(PAGE_SIZE),
    ]
    if role == "decode":
        argv += ["--disaggregation-decode-enable-radix-cache", "--disable-overlap-schedule"]
    return prepare_server_args(argv)


class Peer:
    def __init__(self, role: str, bootstrap_port: int, model_dir: str):
        import torch
        from sglang.srt.disaggregation.utils import (
            DisaggregationMode,
            KVClassType,
            MetadataBuffers,
            TransferBackend,
            get_kv_class,
        )
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.runtime_context import SpawnRanks, get_disagg, get_parallel, publish

        self.role = role
        self.bootstrap_addr = f"127.0.0.1:{bootstrap_port}"
        server_args = _server_args(role, bootstrap_port, model_dir)
        publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
        # What building torch.distributed groups records in a real scheduler; with pp_size 1 and one
        # rank no group is ever used by the transfer path.
        get_parallel().override_permanently(pp_group=None)
        self.backend = TransferBackend(get_disagg().disaggregation_transfer_backend)
        self.bootstrap_server = None
        if role == "prefill":
            from sglang.srt.managers.disagg_service import start_disagg_service

            self.bootstrap_server = start_disagg_service()

        self.pool = MHATokenToKVPool(
            size=POOL_TOKENS, page_size=PAGE_SIZE, dtype=torch.bfloat16, head_num=HEADS, head_dim=HEAD_DIM,
            layer_num=LAYERS, device="cpu", enable_memory_saver=False, enable_alt_stream=False,
        )
        gen = torch.Generator().manual_seed(1 if role == "prefill" else 2)
        for buf in self.pool.k_buffer + self.pool.v_buffer:
            if role == "prefill":
                buf.view(torch.int16).copy_(torch.randint(-2000, 2000, buf.shape, dtype=torch.int16, generator=gen))
            else:
                buf.zero_()
        self.meta = MetadataBuffers(
            META_ROWS, hidden_size=64, hidden_states_dtype=torch.bfloat16, max_sampling_mask_tokens=16
        )

        kv_args = get_kv_class(self.backend, KVClassType.KVARGS)()
        kv_args.engine_rank = 0
        kv_args.kv_data_ptrs, kv_args.kv_data_lens, kv_args.kv_item_lens = self.pool.get_contiguous_buf_infos()
        kv_args.kv_layer_ids = list(range(LAYERS)) * 2
        kv_args.kv_cache_dtype_str = "auto"
        kv_args.aux_data_ptrs, kv_args.aux_data_lens, kv_args.aux_item_lens = self.meta.get_buf_infos()
        for name in ("state_types", "state_data_ptrs", "state_data_lens", "state_item_lens", "state_layer_ids",
                     "state_dim_per_tensor", "state_slice_outer_counts", "state_conv_shard_groups"):
            setattr(kv_args, name, [])
        kv_args.is_hybrid_mla_backend = False
        kv_args.swa_kv_cache_layout = None
        kv_args.ib_device = None
        kv_args.gpu_id = 0
        kv_args.kv_head_num = kv_args.total_kv_head_num = HEADS
        kv_args.page_size = PAGE_SIZE
        kv_args.system_dp_rank = 0
        kv_args.rust_http_port = None
        kv_args.pp_rank = 0
        kv_args.prefill_start_layer, kv_args.prefill_end_layer = 0, LAYERS
        kv_args.mla_compression_ratios = None
        kv_args.kv_buf_groups = 1
        kv_args.hidden_kv_layers, kv_args.draft_kv_layers = LAYERS, 0
        mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
        manager_cls = get_kv_class(self.backend, KVClassType.MANAGER)
        self.manager = manager_cls(kv_args, mode, server_args, False)
        self.sender_cls = get_kv_class(self.backend, KVClassType.SENDER)
        self.receiver_cls = get_kv_class(self.backend, KVClassType.RECEIVER)
        self.senders, self.receivers = {}, {}

    # ------------------------------------------------------------------ commands
    def cmd_info(self):
        return {
            "role": self.role,
            "manager": type(self.manager).__name__,
            "bootstrap_server": type(self.bootstrap_server).__name__ if self.bootstrap_server else None,
            "session": self.manager.get_session_id(),
            "page_bytes": sum(self.manager.kv_args.kv_item_lens),
            "aux_row_bytes": sum(self.manager.kv_args.aux_item_lens),
        }

    def cmd_open_sender(self, room: int):
        self.senders[room] = self.sender_cls(self.manager, self.bootstrap_addr, room)
        return {"status": int(self.senders[room].poll())}

    def cmd_poll(self, room: int):
        return {"status": int(self.senders[room].poll())}

    def cmd_send(self, room: int, pages: list, aux_index: int, first_token: int):
        """Prefill side once the prompt is computed: wait for the decode's destinations, skip the pages
        the decode worker already holds (`pop_decode_prefix_len`, as SGLang's finalize_bootstrap), send."""
        from sglang.srt.disaggregation.base.conn import KVPoll

        sender = self.senders[room]
        status = self._wait(sender, {KVPoll.WaitingForInput, KVPoll.Failed})
        if status == KVPoll.Failed:
            return self._failed(sender, status)
        prefix_len = sender.pop_decode_prefix_len()
        skip = prefix_len // PAGE_SIZE
        to_send = pages[skip:]
        self.meta.output_ids[aux_index][0] = first_token
        self.meta.bootstrap_room[aux_index][0] = room
        before = self.manager.bytes_written
        sender.init(len(to_send), aux_index)
        half = len(to_send) // 2
        import numpy as np

        for chunk in ([to_send[:half], to_send[half:]] if half else [to_send]):  # two chunks, like chunked prefill
            sender.send(np.asarray(chunk, dtype=np.int32))
        status = self._wait(sender, {KVPoll.Success, KVPoll.Failed})
        result = {"status": int(status), "decode_prefix_len": prefix_len, "pages_sent": len(to_send),
                  "bytes": self.manager.bytes_written - before}
        if status == KVPoll.Failed:
            result.update(self._failed(sender, status))
        else:
            sender.clear()
        return result

    def cmd_receive(self, room: int, pages: list, prefix_len: int, aux_index: int):
        """Decode side, as SGLang's pre-allocation queue: resolve the prefill, announce only the delta."""
        import numpy as np

        if not self.manager.try_ensure_parallel_info(self.bootstrap_addr):
            return {"error": f"prefill bootstrap {self.bootstrap_addr} not ready"}
        receiver = self.receiver_cls(self.manager, self.bootstrap_addr, room)
        receiver.init(prefill_dp_rank=0)
        receiver.send_metadata(np.asarray(pages, dtype=np.int32), aux_index, None, decode_prefix_len=prefix_len)
        self.receivers[room] = receiver
        return {"status": int(receiver.poll())}

    def cmd_wait(self, room: int, aux_index: int):
        from sglang.srt.disaggregation.base.conn import KVPoll

        receiver = self.receivers[room]
        status = self._wait(receiver, {KVPoll.Success, KVPoll.Failed})
        if status == KVPoll.Failed:
            return self._failed(receiver, status)
        receiver.clear()
        return {"status": int(status), "first_token": int(self.meta.output_ids[aux_index][0]),
                "room": int(self.meta.bootstrap_room[aux_index][0])}

    def cmd_pages(self, pages: list):
        """Bytes of the given pages in every K/V buffer, hex — compared across the two processes."""
        import torch

        out = []
        for buf in self.pool.k_buffer + self.pool.v_buffer:
            rows = buf.view(torch.int16).view(-1, PAGE_SIZE * HEADS * HEAD_DIM)
            out.append([rows[p].numpy().tobytes().hex() for p in pages])
        return {"pages": out}

    def cmd_fill(self, pages: list, value: int):
        import torch

        for buf in self.pool.k_buffer + self.pool.v_buffer:
            rows = buf.view(torch.int16).view(-1, PAGE_SIZE * HEADS * HEAD_DIM)
            rows[pages] = value
        return {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _wait(obj, terminal):
        deadline = time.monotonic() + POLL_TIMEOUT_S
        status = obj.poll()
        while status not in terminal and time.monotonic() < deadline:
            time.sleep(0.01)
            status = obj.poll()
        return status

    @staticmethod
    def _failed(obj, status):
        try:
            obj.failure_exception()
        except Exception as exc:  # KVTransferError carries the reason
            return {"status": int(status), "reason": str(exc)}
        return {"status": int(status), "reason": ""}


def main() -> None:
    role, bootstrap_port, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.environ.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    # Our protocol owns the real stdout; anything printed by libraries goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from sglang.srt.plugins import load_plugins

    load_plugins()  # the same call every SGLang process makes; loads our entry point
    try:
        peer = Peer(role, bootstrap_port, model_dir)
        proto.write(json.dumps({"ready": True, **peer.cmd_info()}) + "\n")
    except Exception as exc:
        proto.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        raise
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = getattr(peer, "cmd_" + cmd["op"])(**cmd.get("args", {}))
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
