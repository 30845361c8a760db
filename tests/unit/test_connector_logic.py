"""Pure logic of the ampd connector: block arithmetic, read plans, pins, config keys, transfer coalescing."""

import pytest

from ampd_plugin.connector.transfer import coalesce
from ampd_plugin.connector.vllm.config import AMPDConnectorConfig
from ampd_plugin.connector.vllm.holds import RETAIN, SOURCE, HoldTable
from ampd_plugin.connector.vllm.metadata import block_span, external_tokens, history_blocks, read_descriptors
from ampd_plugin.connector.vllm.worker import _merge_regions


def test_history_blocks_leave_the_unfed_last_token_and_one_prompt_token():
    assert history_blocks(history_tokens=129, prompt_len=500, block_size=128) == 1
    assert history_blocks(history_tokens=128, prompt_len=500, block_size=128) == 0  # 127 valid positions
    assert history_blocks(history_tokens=1000, prompt_len=300, block_size=128) == 2  # capped by the prompt
    assert history_blocks(history_tokens=0, prompt_len=300, block_size=128) == 0


def test_external_tokens():
    # decode after a full remote prefill: everything beyond the local hit
    assert external_tokens(600, 600, 0, 128, whole_blocks_only=False) == 600
    assert external_tokens(600, 600, 512, 128, whole_blocks_only=False) == 88
    # partial prefill: P computed only 300 of 600
    assert external_tokens(300, 600, 0, 128, whole_blocks_only=False) == 300
    # history read: whole blocks only, nothing if the local hit already covers them
    assert external_tokens(385, 900, 0, 128, whole_blocks_only=True) == 384
    assert external_tokens(385, 900, 384, 128, whole_blocks_only=True) == 0


def test_block_span():
    assert list(block_span(0, 600, 128)) == [0, 1, 2, 3, 4]
    assert list(block_span(512, 88, 128)) == [4]
    assert list(block_span(256, 129, 128)) == [2, 3]
    assert list(block_span(0, 0, 128)) == []


def test_read_descriptors_merge_contiguous_blocks_per_layer():
    lo, re, ln = read_descriptors([4, 5, 9], [10, 11, 12], (1000, 2000), (5000, 6000), 10)
    assert ln == [20, 10, 20, 10]
    assert lo == [1040, 1090, 2040, 2090] and re == [5100, 5120, 6100, 6120]
    with pytest.raises(ValueError):
        read_descriptors([1], [1], (1,), (1, 2), 10)


def test_coalesce_and_merge_regions():
    assert coalesce([0, 10, 30], [100, 110, 120], 10) == [(0, 100, 20), (30, 120, 10)]
    assert _merge_regions([(100, 50), (0, 100), (300, 10)]) == [(0, 150), (300, 10)]


class FakeClock:
    t = 0.0

    def __call__(self):
        return self.t


def test_hold_table_pins_and_releases():
    refs: dict[str, int] = {}
    pin = lambda blocks: [refs.__setitem__(b, refs.get(b, 0) + 1) for b in blocks]
    freed: list[list[str]] = []

    def unpin(blocks):
        freed.append(list(blocks))
        for b in blocks:
            refs[b] -= 1

    clock = FakeClock()
    table = HoldTable(pin, unpin, clock)
    table.add("x1", SOURCE, ["a", "b"], ttl_s=10)
    table.add("r1", RETAIN, ["a", "b", "c"], ttl_s=100, session="s")
    clock.t = 1
    table.add("r2", RETAIN, ["d"], ttl_s=100, session="t")
    assert refs == {"a": 2, "b": 2, "c": 1, "d": 1} and table.count(RETAIN) == 2
    assert freed == []
    clock.t = 11
    assert table.release_expired() == ["x1"]
    assert freed[-1] == ["b", "a"]  # tail first
    assert table.release_oldest(RETAIN) == "r1"
    assert table.release_session("t") == 1 and len(table) == 0
    assert all(v == 0 for v in refs.values())
    assert table.release("nope") is False


def test_config_keys_are_checked():
    cfg = AMPDConnectorConfig.from_extra_config({"protocol": "rdma", "retention_ttl_s": "5"})
    assert cfg.protocol == "rdma" and cfg.retention_ttl_s == 5.0
    with pytest.raises(ValueError, match="unknown"):
        AMPDConnectorConfig.from_extra_config({"mooncake_protocol": "tcp"})
    with pytest.raises(ValueError, match="protocol"):
        AMPDConnectorConfig.from_extra_config({"protocol": "udp"})
    with pytest.raises(ValueError, match="not a float"):
        AMPDConnectorConfig.from_extra_config({"hold_ttl_s": "soon"})
