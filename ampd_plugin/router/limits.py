"""Bounds on what one client may make the router hold or spend: header bytes and count, read time, JSON depth,
prompt characters.

Why at the protocol level: uvicorn's httptools protocol buffers a header line until it is complete and has
no read deadline before the first request or while a body trickles in, so one 64 MiB header or a few hundred
half-sent requests stall or exhaust the router before any application code runs. `guarded_protocol` returns
a subclass that counts the bytes of the request head as they arrive (431 once over the limit, before the
rest is buffered; a head that completes within one read is measured exactly from the parser's URL and header
callbacks, so a body in the same read never counts as head), counts header lines (431), gives the head a total deadline and the body an idle deadline
(408 / close). The body's size limit is enforced while reading, in `intake.read_json`.

JSON depth: orjson (>= 3.10) refuses nesting beyond 1024 levels instead of overflowing the C stack, but
`orjson.dumps` cannot re-encode more than 255 levels, and no OpenAI request needs more than a handful;
`check_depth` refuses anything deeper than the configured limit with a 400.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ampd_plugin.router.errors import bad_request

MAX_ENCODABLE_DEPTH = 255  # orjson.dumps raises beyond this nesting


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a parse error, which ends in send_400_response."""


def guarded_protocol(max_header_bytes: int, max_headers: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[HttpToolsProtocol]:
    """An httptools protocol class for uvicorn (`http=`) that enforces the head/body bounds above."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._in_head = True
            self._head_bytes = 0
            self._head_started = False  # some byte of the current request head arrived
            self._header_count = 0
            self._head_exact = 0  # URL + header bytes of the current head, from the parser callbacks
            self._heads_done = 0
            self._refused = False
            self._last_data = self.loop.time()
            self._deadline: asyncio.TimerHandle | None = None
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._last_data = self.loop.time()
            was_head, heads_done = self._in_head, self._heads_done
            if was_head:
                self._head_started = True
                if self._deadline is None:
                    self._arm_head_deadline()  # a new request on a kept-alive connection
            super().data_received(data)
            if was_head and self._in_head and self._heads_done == heads_done and not self._refused:
                # The whole chunk belonged to a head that is still incomplete (the parser buffers it).
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, f"request header exceeds {max_header_bytes} bytes")

        # --- parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_count = 0
            self._head_exact = 0

        def on_url(self, url: bytes) -> None:
            self._head_exact += len(url)
            if self._head_exact > max_header_bytes:
                raise _HeadTooLarge
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            self._head_exact += len(name) + len(value) + 4  # ": " and CRLF
            if self._header_count > max_headers or self._head_exact > max_header_bytes:
                raise _HeadTooLarge
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._heads_done += 1
            self._head_bytes = 0
            self._head_started = False
            self._cancel_deadline()
            self._arm(body_timeout_s, self._body_idle)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._cancel_deadline()
            self._in_head = True
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            too_big = max(self._head_bytes, self._head_exact) > max_header_bytes
            if self._header_count > max_headers or too_big or self._refused:
                self._refuse(431, f"request header exceeds {max_headers} fields or {max_header_bytes} bytes")
            else:
                super().send_400_response(msg)

        # --- deadlines
        def _arm(self, delay: float, callback) -> None:
            self._cancel_deadline()
            self._deadline = self.loop.call_later(max(delay, 0.001), callback)

        def _arm_head_deadline(self) -> None:
            self._arm(header_timeout_s, self._head_expired)

        def _cancel_deadline(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_expired(self) -> None:
            self._deadline = None
            if self._in_head and not self.transport.is_closing():
                if self._head_started:
                    self._refuse(408, f"request header not received within {header_timeout_s:g} s")
                else:
                    self.transport.close()  # nothing sent at all: just hang up

        def _body_idle(self) -> None:
            self._deadline = None
            if self._in_head or self.transport.is_closing():
                return
            idle = self.loop.time() - self._last_data
            if self.flow.read_paused or idle < body_timeout_s:  # the app is not reading, or data is flowing
                self._arm(body_timeout_s - (0 if self.flow.read_paused else idle), self._body_idle)
                return
            self.transport.close()  # the app sees http.disconnect and answers nothing

        def _refuse(self, status: int, msg: str) -> None:
            """Answer `status` with a short text body and close; nothing more is read from this connection."""
            self._refused = True
            self._cancel_deadline()
            if self.transport.is_closing():
                return
            body = msg.encode("ascii", "replace")
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n\r\n", body]))
            self.transport.close()

    return GuardedHttpToolsProtocol


def check_depth(value: object, limit: int) -> None:
    """400 when `value` (parsed JSON) nests deeper than `limit` containers; iterative, so never recursion-bound."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise bad_request(f"request body nests deeper than {limit} levels", "invalid_json")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def cheap_depth_bound(raw: bytes) -> int:
    """An upper bound on the nesting of `raw` JSON: the number of opening brackets (C speed)."""
    return raw.count(b"{") + raw.count(b"[")


def prompt_chars(body: dict, chat: bool) -> int:
    """Characters of prompt text a request carries, counted without rendering the chat template."""
    if not chat:
        p = body.get("prompt")
        if isinstance(p, str):
            return len(p)
        if isinstance(p, list):
            return sum(len(x) if isinstance(x, str) else 1 for x in p)
        return 0
    total = 0
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            total += len(c)
        elif isinstance(c, list):
            total += sum(len(p.get("text") or "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total

