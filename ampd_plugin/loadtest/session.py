"""Playing one multi-round session against an OpenAI-compatible endpoint and recording every round.

The HTTP client is injected (`Transport`), so the same code runs under Locust (gevent, its HttpSession)
and in unit tests (a list of byte chunks). A round: append the tool/retrieval result (synthetic text of
the round's input length) as the next user message, stream `/v1/chat/completions` with `X-Session-ID`,
`max_tokens` = the round's output length and `ignore_eos` (so lengths hold whatever the model says),
append the answer to the chat, then wait the round's tool delay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ampd_plugin.loadtest.prompts import TextSynthesizer
from ampd_plugin.loadtest.stream import SSEStreamParser, StreamError, StreamMeasurement
from ampd_plugin.slo import RoundRecord

SESSION_HEADER = "X-Session-ID"
# Optional per-response headers a router may set; read when present (see docs/demo.md).
ROUTE_HEADER = "x-ampd-route"
WORKER_HEADER = "x-ampd-worker"
KV_BYTES_HEADER = "x-ampd-kv-bytes"

# transport(payload, headers) -> (response headers, iterable of body pieces as they arrive).
# It raises on connection errors and non-2xx statuses.
Transport = Callable[[dict, dict], "tuple[Mapping[str, str], Iterable[bytes]]"]


@dataclass
class LoadRecord(RoundRecord):
    """A RoundRecord plus what only a live load test sees."""

    prompt_tokens: int = 0  # as counted by the server (whole chat), 0 if it did not say
    cached_tokens: int = 0  # server-reported prefix-cache hit, 0 if it did not say
    chunks: int = 0  # non-empty content chunks received
    max_gap: float | None = None  # the longest inter-token gap of the round (a decode stall)
    late_start: float = 0.0  # session start later than its scheduled arrival (no free Locust user)
    source: str = ""  # the Locust process that measured it


@dataclass
class RoundResult:
    record: LoadRecord
    measurement: StreamMeasurement | None


class SessionPlayer:
    """Plays sessions round by round through a transport; pure apart from the injected clock/sleep."""

    def __init__(
        self,
        transport: Transport,
        synthesizer: TextSynthesizer,
        model: str,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        on_round: Callable[[RoundResult], None] | None = None,
        source: str = "",
        extra_body: dict | None = None,
    ) -> None:
        self.transport = transport
        self.synthesizer = synthesizer
        self.model = model
        self.clock = clock
        self.sleep = sleep
        self.on_round = on_round
        self.source = source
        self.extra_body = extra_body or {}

    def request_body(self, messages: list[dict], max_tokens: int) -> dict:
        return {
            "model": self.model,
            "messages": list(messages),  # a snapshot: the chat grows after this round
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            **self.extra_body,
        }

    def play(self, session, late_start: float = 0.0) -> list[LoadRecord]:
        """All rounds of `session` (an ampd_plugin.workload.Session); stops at the first failed round."""
        messages: list[dict] = []
        records: list[LoadRecord] = []
        for index, rnd in enumerate(session.rounds):
            content = self.synthesizer.text(rnd.input_tokens, str(session.session_id), index)
            messages.append({"role": "user", "content": content or "."})
            result = self.play_round(session, index, rnd, messages, late_start if index == 0 else 0.0)
            records.append(result.record)
            if self.on_round is not None:
                self.on_round(result)
            if result.record.error is not None:
                break
            messages.append({"role": "assistant", "content": result.measurement.text})
            if index + 1 < len(session.rounds) and rnd.tool_delay_s > 0:
                self.sleep(rnd.tool_delay_s)
        return records

    def play_round(self, session, index: int, rnd, messages: list[dict], late_start: float) -> RoundResult:
        body = self.request_body(messages, max(1, int(rnd.output_tokens)))
        headers = {SESSION_HEADER: str(session.session_id)}
        t_sent = self.clock()
        parser = SSEStreamParser(t_sent)
        response_headers: Mapping[str, str] = {}
        error: str | None = None
        try:
            response_headers, pieces = self.transport(body, headers)
            for piece in pieces:
                parser.feed(piece, self.clock())
            m = parser.close(self.clock())
            if m.t_first is None:
                error = "stream ended without any token"
        except StreamError as exc:
            m, error = parser.measurement, str(exc)
        except Exception as exc:  # noqa: BLE001 — any transport failure is this round's error, not a crash
            m, error = parser.measurement, f"{type(exc).__name__}: {exc}"
        record = self._record(session, index, rnd, m, response_headers, error, late_start)
        return RoundResult(record, m if error is None else None)

    def _record(self, session, index, rnd, m: StreamMeasurement, headers, error, late_start) -> LoadRecord:
        lower = {k.lower(): v for k, v in dict(headers or {}).items()}
        try:
            kv_bytes = int(lower.get(KV_BYTES_HEADER, 0) or 0)
        except ValueError:
            kv_bytes = 0
        return LoadRecord(
            session_id=str(session.session_id),
            round_index=index,
            ttft=m.ttft if m.ttft is not None else float("nan"),
            itl=m.tpot,
            input_tokens=int(rnd.input_tokens),
            output_tokens=m.output_tokens,
            route=lower.get(ROUTE_HEADER, ""),
            worker=lower.get(WORKER_HEADER, ""),
            kv_bytes=kv_bytes,
            start=m.t_sent,
            error=error,
            prompt_tokens=m.prompt_tokens,
            cached_tokens=m.cached_tokens,
            chunks=m.content_chunks,
            max_gap=max(m.gaps) if m.gaps else None,
            late_start=late_start,
            source=self.source,
        )
