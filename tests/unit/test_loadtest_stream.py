"""SSE parsing and hand-measured stream timings (TTFT at the first non-empty token, gaps, TPOT)."""

import json

import pytest

from ampd_plugin.loadtest.stream import SSEStreamParser, StreamError


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _content(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_ttft_skips_role_only_and_empty_chunks_and_done_is_seen():
    p = SSEStreamParser(t_sent=100.0)
    p.feed(_event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}), 100.2)
    p.feed(_event(_content("")), 100.3)  # SGLang-style empty first chunk
    p.feed(_event(_content("Hello")), 100.5)
    p.feed(_event(_content(" world")), 100.6)
    p.feed(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}), 100.61)
    p.feed(_event(_content("!")), 100.8)
    p.feed(b"data: [DONE]\n\n", 100.9)
    m = p.close(101.0)
    assert m.ttft == pytest.approx(0.5)
    assert m.text == "Hello world!"
    assert m.content_chunks == 3 and m.done and m.finish_reason == "length"
    assert m.gaps == pytest.approx([0.1, 0.2])
    # no usage chunk: tokens = content chunks; TPOT = (t_last - t_first) / (n - 1)
    assert m.output_tokens == 3
    assert m.tpot == pytest.approx((100.8 - 100.5) / 2)


def test_usage_chunk_gives_token_count_for_tpot():
    p = SSEStreamParser(t_sent=0.0)
    p.feed(_event(_content("ab")), 1.0)  # one chunk may carry several tokens
    p.feed(_event(_content("cd")), 2.0)
    p.feed(_event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                                            "prompt_tokens_details": {"cached_tokens": 4}}}), 2.1)
    m = p.close(2.2)
    assert m.output_tokens == 5 and m.prompt_tokens == 7 and m.cached_tokens == 4
    assert m.tpot == pytest.approx((2.0 - 1.0) / 4)


def test_events_split_across_network_reads_and_comments():
    payload = b": keep-alive\n\n" + _event(_content("x")) + _event(_content("y")) + b"data: [DONE]"
    p = SSEStreamParser(t_sent=0.0)
    for i in range(len(payload)):  # one byte at a time
        p.feed(payload[i:i + 1], float(i))
    m = p.close(999.0)
    assert m.text == "xy" and m.done  # the unterminated last line is parsed on close
    assert m.t_first < m.t_last


def test_single_token_has_no_tpot():
    p = SSEStreamParser(t_sent=0.0)
    p.feed(_event(_content("x")), 0.3)
    m = p.close(0.4)
    assert m.ttft == pytest.approx(0.3) and m.tpot is None and m.gaps == []


def test_completions_api_text_field():
    p = SSEStreamParser(t_sent=0.0)
    p.feed(_event({"choices": [{"index": 0, "text": "hi"}]}), 0.2)
    assert p.close(0.3).text == "hi"


@pytest.mark.parametrize("line,match", [
    (b"data: {not json}\n", "not JSON"),
    (b'data: {"error": {"message": "boom", "code": 500}}\n', "boom"),
    (b'data: [1, 2]\n', "unexpected"),
])
def test_bad_streams_raise_clear_errors(line, match):
    p = SSEStreamParser(t_sent=0.0)
    with pytest.raises(StreamError, match=match):
        p.feed(line, 1.0)
