"""Hostile input against the real uvicorn-served router: nested JSON, huge headers, slow clients, huge prompts."""

import asyncio
import json
import logging
import time

import pytest
from router_fakes import MODEL, RouterHarness, run

from ampd_plugin.router.limits import check_depth, prompt_chars
from ampd_plugin.router.errors import RouterError

USER = [{"role": "user", "content": "hello"}]


async def _raw(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return what the server answered until it closed (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            out += chunk
    except (asyncio.TimeoutError, ConnectionResetError):
        pass
    writer.close()
    return out


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_check_depth_counts_containers_iteratively():
    check_depth({"a": [{"b": 1}]}, 3)
    with pytest.raises(RouterError):
        check_depth({"a": [{"b": 1}]}, 2)
    deep = x = []
    for _ in range(100_000):  # far beyond Python's recursion limit: still no RecursionError
        x.append([])
        x = x[0]
    with pytest.raises(RouterError):
        check_depth(deep, 32)


def test_prompt_chars_counts_message_and_prompt_text():
    assert prompt_chars({"messages": [{"role": "u", "content": "abc"},
                                      {"role": "u", "content": [{"type": "text", "text": "de"}]}]}, True) == 5
    assert prompt_chars({"prompt": ["ab", "c"]}, False) == 3 and prompt_chars({"prompt": [1, 2]}, False) == 2


@pytest.mark.parametrize("depth", [40, 300, 60_000])
def test_deeply_nested_json_is_a_400_and_the_router_lives(depth):
    async def main():
        async with RouterHarness(policy="colocated") as h:
            nested = b'{"a":' * depth + b"1" + b"}" * depth
            body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"x":' % MODEL.encode() + nested + b"}"
            async with h.client.post(h.url + "/v1/chat/completions", data=body) as r:
                got = r.status, await r.json(content_type=None)
            ok = await h.chat(USER)
            return got, ok[0], h.decode[0].requests

    (status, err), ok, reqs = run(main())
    assert status == 400 and err["error"]["code"] == "invalid_json" and ok == 200 and len(reqs) == 1


def test_nesting_within_the_limit_is_served():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            nested = b'{"a":' * 20 + b"1" + b"}" * 20
            body = b'{"messages":[{"role":"user","content":"hi"}],"metadata":' + nested + b"}"
            async with h.client.post(h.url + "/v1/chat/completions", data=body) as r:
                return r.status

    assert run(main()) == 200


def test_huge_header_is_refused_431_before_it_is_buffered():
    async def main():
        async with RouterHarness(policy="colocated", max_header_bytes=16 * 1024) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent, answer = 0, b""
            t0 = time.monotonic()
            try:  # keep sending one header value until the router answers: it must not wait for its end
                while sent < 64 * 1024 * 1024 and not answer:
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536
                    try:
                        answer = await asyncio.wait_for(reader.read(4096), 0.001)
                    except asyncio.TimeoutError:
                        pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            if not answer:
                answer = await asyncio.wait_for(reader.read(4096), 5)
            writer.close()
            ok = await h.chat(USER)
            return answer, sent, time.monotonic() - t0, ok[0]

    answer, sent, elapsed, ok = run(main())
    assert answer.startswith(b"HTTP/1.1 431") and sent < 4 * 1024 * 1024 and ok == 200


def test_too_many_headers_is_431():
    async def main():
        async with RouterHarness(policy="colocated", max_headers=20) as h:
            extra = b"".join(b"X-H%d: v\r\n" % i for i in range(50))
            body = json.dumps({"messages": USER}).encode()
            many = await _raw(h.port, _post(body, extra))
            few = await _raw(h.port, _post(body, b"".join(b"X-H%d: v\r\n" % i for i in range(5)) + b"Connection: close\r\n"))
            return many, few

    many, few = run(main())
    assert many.startswith(b"HTTP/1.1 431") and few.startswith(b"HTTP/1.1 200")


def test_head_size_is_measured_exactly_when_head_and_body_arrive_in_one_read():
    """A body larger than max_header_bytes sent with its head in one write is served; a head over the limit
    that arrives whole in one read is still 431."""
    async def main():
        async with RouterHarness(policy="colocated", max_header_bytes=16 * 1024) as h:
            body = json.dumps({"messages": USER, "max_tokens": 4}).encode()
            body = body[:-1] + b" " * 40_000 + b"}"  # JSON whitespace: a 40 KB body, a short prompt
            big_body = await _raw(h.port, _post(body, b"Connection: close\r\n"))
            big_head = await _raw(h.port, _post(b"{}", b"X-Long: " + b"v" * 20_000 + b"\r\nConnection: close\r\n"))
            return big_body, big_head

    big_body, big_head = run(main())
    assert big_body.startswith(b"HTTP/1.1 200") and big_head.startswith(b"HTTP/1.1 431")


def test_slowloris_connections_are_cut_off_at_the_read_deadline():
    async def main():
        async with RouterHarness(policy="colocated", client_header_timeout_s=0.5, client_body_timeout_s=0.5) as h:
            conns = []
            for i in range(100):
                r, w = await asyncio.open_connection("127.0.0.1", h.port)
                if i % 3 == 0:
                    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a head
                elif i % 3 == 1:
                    w.write(_post(b'{"messages": [{"role": "user", "content": "hi"}]}')[:-20])  # half a body
                conns.append((r, w))  # i % 3 == 2: sends nothing at all
            t0 = time.monotonic()
            closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in conns))
            elapsed = time.monotonic() - t0
            for _, w in conns:
                w.close()
            ok = await h.chat(USER)
            return closed, elapsed, ok[0]

    closed, elapsed, ok = run(main())
    assert len(closed) == 100 and elapsed < 3 and ok == 200
    heads = [c for i, c in enumerate(closed) if i % 3 == 0]
    assert all(c.startswith(b"HTTP/1.1 408") for c in heads)


def test_a_client_dropping_mid_upload_logs_no_traceback(caplog):
    async def main():
        async with RouterHarness(policy="colocated") as h:
            for _ in range(5):
                r, w = await asyncio.open_connection("127.0.0.1", h.port)
                w.write(_post(b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}')[:-100])
                await w.drain()
                await asyncio.sleep(0.05)
                w.close()
            await asyncio.sleep(0.3)
            return (await h.chat(USER))[0], await h.metrics_text()

    with caplog.at_level(logging.WARNING):
        ok, metrics = run(main())
    assert ok == 200
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert 'kind="client_disconnect"' in metrics


def test_huge_prompt_is_refused_by_characters_and_stores_nothing():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            big = [{"role": "user", "content": "x" * 2_000_000}]
            t0 = time.monotonic()
            status, err, _ = await h.chat(big, session="victim")
            took = time.monotonic() - t0
            return status, err, took, len(h.router.sessions), h.decode[0].requests

    status, err, took, n_sessions, reqs = run(main())
    assert status == 400 and err["error"]["code"] == "context_length_exceeded" and "characters" in err["error"]["message"]
    assert n_sessions == 0 and reqs == []


def test_rejected_round_of_a_session_keeps_its_previous_prompt():
    async def main():
        async with RouterHarness(policy="colocated") as h:
            await h.chat(USER, session="s")
            kept = h.router.sessions.get("s", True).last_text
            status, _, _ = await h.chat([{"role": "user", "content": "y " * 5000}], session="s")
            return status, kept, h.router.sessions.get("s", True).last_text

    status, kept, after = run(main())
    assert status == 400 and kept and after == kept


def test_bearer_scheme_is_case_insensitive():
    async def main():
        async with RouterHarness(policy="colocated", api_key="k3y") as h:
            out = []
            for auth in ("Bearer k3y", "bearer k3y", "BEARER  k3y", "Basic k3y", "bearer wrong", ""):
                out.append((await h.chat(USER, headers={"Authorization": auth} if auth else {}))[0])
            return out

    assert run(main()) == [200, 200, 200, 401, 401, 401]
