"""Measuring one streamed chat completion by hand: TTFT, inter-token gaps, TPOT.

Locust's own response time for a streamed request is the time to the response *headers*, not to the
first token, so every latency the load test reports comes from here. The parser is fed raw bytes as they
arrive, each piece stamped with the time it arrived, and knows nothing about HTTP clients, so it is
tested without a server.

Conventions (the ones vLLM's benchmarks and DistServe use, see slo.py):
- TTFT is the time from sending the request to the first chunk whose `delta.content` is non-empty
  (engines often send a role-only or empty first chunk; counting it would flatter TTFT).
- Inter-token gaps (ITL samples) are the times between consecutive non-empty content chunks.
- The number of output tokens is the server's `usage.completion_tokens` when the stream carries it
  (`stream_options.include_usage`), else the number of non-empty content chunks.
- TPOT = (t_last − t_first)/(n_out − 1), computed by `slo.tpot`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ampd_plugin import slo


class StreamError(Exception):
    """The server sent an error object or a line that is not valid SSE JSON."""


@dataclass
class StreamMeasurement:
    """Everything measured about one streamed response (times are absolute, seconds)."""

    t_sent: float
    t_first: float | None = None
    t_last: float | None = None
    content_chunks: int = 0
    gaps: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    usage: dict | None = None
    done: bool = False  # saw `data: [DONE]`
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_sent

    @property
    def output_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return self.content_chunks

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)

    @property
    def tpot(self) -> float | None:
        if self.t_first is None or self.t_last is None:
            return None
        return slo.tpot(self.t_first, self.t_last, self.output_tokens)


class SSEStreamParser:
    """Incremental parser of an OpenAI-style server-sent-event stream of chat completion chunks."""

    def __init__(self, t_sent: float) -> None:
        self.measurement = StreamMeasurement(t_sent=t_sent)
        self._buffer = b""

    def feed(self, data: bytes, now: float) -> None:
        """Add bytes that arrived at time `now`; complete lines are parsed at once."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line.strip(), now)

    def close(self, now: float) -> StreamMeasurement:
        """End of the body: parse a last unterminated line and return the measurement."""
        if self._buffer.strip():
            self._line(self._buffer.strip(), now)
        self._buffer = b""
        return self.measurement

    def _line(self, line: bytes, now: float) -> None:
        if not line or line.startswith(b":"):  # blank separator or SSE comment/keep-alive
            return
        if not line.startswith(b"data:"):
            return  # `event:`/`id:` fields carry nothing we use
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.measurement.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise StreamError(f"not JSON in the event stream: {payload[:200]!r}") from exc
        if not isinstance(chunk, dict):
            raise StreamError(f"unexpected event in the stream: {payload[:200]!r}")
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise StreamError(f"server error in the stream: {message}")
        self._chunk(chunk, now)

    def _chunk(self, chunk: dict, now: float) -> None:
        m = self.measurement
        if chunk.get("usage"):
            m.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content is None:  # completions API streams `text`
                content = choice.get("text")
            if choice.get("finish_reason"):
                m.finish_reason = choice["finish_reason"]
            if not content and not choice.get("token_ids"):  # a chunk of token ids is a token too
                continue
            if m.t_first is None:
                m.t_first = now
            else:
                m.gaps.append(now - m.t_last)
            m.t_last = now
            m.content_chunks += 1
            m.text_parts.append(content or "")
