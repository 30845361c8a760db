"""A session played through a scripted transport: chat growth, request bodies, SLO arithmetic per round."""

import json

import pytest

from ampd_plugin import slo
from ampd_plugin.loadtest.prompts import TextSynthesizer
from ampd_plugin.loadtest.report import build_report
from ampd_plugin.loadtest.session import SessionPlayer
from ampd_plugin.workload import Round, Session


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def _ev(obj):
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def scripted_transport(clock, ttft, gap, fail_round=None, headers=None):
    """Each request: TTFT `ttft`, then one token every `gap` s, exactly max_tokens tokens."""
    calls = []

    def transport(body, hdrs):
        calls.append((body, hdrs))
        if fail_round is not None and len(calls) - 1 == fail_round:
            raise ConnectionError("peer gone")

        def pieces():
            clock.now += ttft
            yield _ev({"choices": [{"delta": {"role": "assistant"}}]})
            for i in range(body["max_tokens"]):
                if i:
                    clock.now += gap
                yield _ev({"choices": [{"delta": {"content": f"t{i} "}}]})
            yield _ev({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": body["max_tokens"]}})
            yield b"data: [DONE]\n\n"

        return headers or {}, pieces()

    return transport, calls


SESSION = Session("s1", 0.0, [Round(5, 3, 2.0), Round(4, 5, 1.5), Round(6, 1, 0.0)])


def _player(transport, clock, **kw):
    return SessionPlayer(transport, TextSynthesizer(None, seed=1), "m", clock=clock, sleep=clock.sleep, **kw)


def test_rounds_grow_the_chat_and_send_the_session_header():
    clock = FakeClock()
    transport, calls = scripted_transport(clock, ttft=0.2, gap=0.05, headers={"X-AMPD-Route": "remote",
                                                                             "x-ampd-kv-bytes": "4096"})
    records = _player(transport, clock).play(SESSION)
    assert [len(body["messages"]) for body, _ in calls] == [1, 3, 5]
    assert [m["role"] for m in calls[-1][0]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert calls[1][0]["messages"][1]["content"] == "t0 t1 t2 "  # the streamed answer became history
    assert all(h["X-Session-ID"] == "s1" for _, h in calls)
    assert [b["max_tokens"] for b, _ in calls] == [3, 5, 1]
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"]["include_usage"] for b, _ in calls)
    assert clock.slept == [2.0, 1.5]  # tool delays between rounds, none after the last
    assert [r.route for r in records] == ["remote"] * 3 and records[0].kv_bytes == 4096


def test_ttft_and_tpot_per_round():
    clock = FakeClock()
    transport, _ = scripted_transport(clock, ttft=0.2, gap=0.05)
    records = _player(transport, clock).play(SESSION)
    assert [r.ttft for r in records] == pytest.approx([0.2, 0.2, 0.2])
    # TPOT = (t_last - t_first) / (n_out - 1) = gap; one-token round has none
    assert records[0].itl == pytest.approx(0.05) and records[1].itl == pytest.approx(0.05)
    assert records[2].itl is None
    assert [r.output_tokens for r in records] == [3, 5, 1]
    assert records[1].max_gap == pytest.approx(0.05)


@pytest.mark.parametrize("ttft,gap,expected", [
    (0.2, 0.05, 1.0),   # both met
    (0.6, 0.05, 0.0),   # TTFT missed
    (0.2, 0.15, 1 / 3),  # ITL missed in the multi-token rounds; the 1-token round is judged by TTFT only
])
def test_round_meets_slo_only_if_ttft_and_itl_both_do(ttft, gap, expected):
    clock = FakeClock()
    transport, _ = scripted_transport(clock, ttft=ttft, gap=gap)
    records = _player(transport, clock).play(SESSION)
    report = build_report(records, ttft_slo=0.5, itl_slo=0.1, slo_target=0.9)
    assert report["summary"]["slo_attainment"] == pytest.approx(expected)
    assert report["summary"]["slo_attainment"] == pytest.approx(slo.attainment(records, 0.5, 0.1))
    assert report["session_attainment"] == (1.0 if expected == 1.0 else 0.0)


def test_failed_round_ends_the_session_with_an_error_record():
    clock = FakeClock()
    transport, calls = scripted_transport(clock, ttft=0.1, gap=0.01, fail_round=1)
    seen = []
    records = _player(transport, clock, on_round=seen.append).play(SESSION)
    assert len(calls) == 2 and len(records) == 2 == len(seen)
    assert records[1].error.startswith("ConnectionError: peer gone")
    assert not slo.meets_slo(records[1], 10, 10)
    assert seen[1].measurement is None


def test_empty_stream_is_an_error_not_a_crash():
    clock = FakeClock()
    records = _player(lambda b, h: ({}, iter([b"data: [DONE]\n\n"])), clock).play(SESSION)
    assert records[0].error == "stream ended without any token" and len(records) == 1
