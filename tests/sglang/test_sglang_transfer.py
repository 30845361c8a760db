"""Real transfers through the ampd SGLang backend: two processes (prefill and decode), SGLang's bootstrap
server, SGLang's KV pool and metadata buffers on CPU, Mooncake moving the bytes over loopback TCP.

Runs inside a loopback-only network namespace (scripts/test_sglang.sh)."""

from __future__ import annotations

import time

import pytest

from ampd_plugin.localcluster import free_ports

pytest.importorskip("sglang", reason="needs .venv-sglang (scripts/test_sglang.sh)")
pytestmark = pytest.mark.integration

SUCCESS, WAITING_FOR_INPUT, FAILED = 4, 2, 0  # sglang KVPoll values
PAGE_SIZE = 4


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def _pair(start_peers):
    (port,) = free_ports(1)
    prefill, decode = start_peers(("prefill", port), ("decode", port))
    return prefill, decode


def test_multi_round_moves_only_the_delta(start_peers):
    prefill, decode = _pair(start_peers)
    assert prefill.info["manager"] == "AmpdKVManager" and decode.info["manager"] == "AmpdKVManager"
    assert prefill.info["bootstrap_server"] == "AmpdKVBootstrapServer"
    page_bytes, aux_row = prefill.info["page_bytes"], prefill.info["aux_row_bytes"]

    # Round 1: a 16-token prompt (4 pages) computed on prefill pages 1..4, received into decode pages 10..13.
    src1, dst1 = [1, 2, 3, 4], [10, 11, 12, 13]
    prefill.call("open_sender", room=101)
    decode.call("receive", room=101, pages=dst1, prefix_len=0, aux_index=3)
    sent = prefill.call("send", room=101, pages=src1, aux_index=5, first_token=1234)
    got = decode.call("wait", room=101, aux_index=3)
    assert sent["status"] == SUCCESS and got["status"] == SUCCESS, (sent, got)
    assert sent["decode_prefix_len"] == 0 and sent["pages_sent"] == 4
    assert sent["bytes"] == 4 * page_bytes + aux_row
    assert got["first_token"] == 1234 and got["room"] == 101
    assert decode.call("pages", pages=dst1)["pages"] == prefill.call("pages", pages=src1)["pages"]

    # The decode worker now holds those 16 tokens in its radix cache. Mark them so a re-send would show.
    decode.call("fill", pages=dst1, value=7)
    held = decode.call("pages", pages=dst1)["pages"]

    # Round 2: history (16 tokens) + 8 new tokens. Prefill holds all 6 pages; decode announces only the
    # 2 new pages and decode_prefix_len=16, as SGLang's decode pre-allocation does with its radix cache.
    src2, dst_delta = [1, 2, 3, 4, 5, 6], [14, 15]
    prefill.call("open_sender", room=102)
    decode.call("receive", room=102, pages=dst_delta, prefix_len=16, aux_index=4)
    sent = prefill.call("send", room=102, pages=src2, aux_index=6, first_token=4321)
    got = decode.call("wait", room=102, aux_index=4)
    assert sent["status"] == SUCCESS and got["status"] == SUCCESS, (sent, got)
    assert sent["decode_prefix_len"] == 16 and sent["pages_sent"] == 2
    assert sent["bytes"] == 2 * page_bytes + aux_row  # only the delta moved
    assert decode.call("pages", pages=dst_delta)["pages"] == prefill.call("pages", pages=[5, 6])["pages"]
    assert decode.call("pages", pages=dst1)["pages"] == held  # history pages untouched
    assert got["first_token"] == 4321


def test_failed_peers_fail_the_request_not_the_worker(start_peers):
    (port,) = free_ports(1)
    prefill, decode, decode2 = start_peers(("prefill", port), ("decode", port), ("decode", port))

    # Decode worker dies after announcing its pages: the prefill side reports Failed with a reason.
    prefill.call("open_sender", room=201)
    decode.call("receive", room=201, pages=[10, 11], prefix_len=0, aux_index=1)
    wait_until(lambda: prefill.call("poll", room=201)["status"] == WAITING_FOR_INPUT, 20,
               "prefill never saw the decode's destinations")
    decode.kill()
    sent = prefill.call("send", room=201, pages=[1, 2], aux_index=1, first_token=1)
    assert sent["status"] == FAILED
    print("prefill-side reason:", sent["reason"])
    assert "mooncake write" in sent["reason"] or "decode" in sent["reason"], sent

    # The prefill worker keeps serving other decode workers.
    prefill.call("open_sender", room=202)
    decode2.call("receive", room=202, pages=[20, 21], prefix_len=0, aux_index=2)
    sent = prefill.call("send", room=202, pages=[3, 4], aux_index=2, first_token=2)
    assert sent["status"] == SUCCESS, sent
    assert decode2.call("wait", room=202, aux_index=2)["status"] == SUCCESS

    # Prefill worker dies while a decode worker waits: the heartbeat fails the request (bounded wait).
    decode2.call("receive", room=203, pages=[22, 23], prefix_len=0, aux_index=3)
    prefill.kill()
    got = decode2.call("wait", room=203, aux_index=3)
    assert got["status"] == FAILED
    print("decode-side reason:", got["reason"])
    assert "prefill" in got["reason"].lower(), got
