"""The token ids a relayed stream showed (vLLM's `return_token_ids`): enough to continue it elsewhere.

Per event only a regex search and, when the client did not ask for the ids, a regex substitution that
removes them again; no JSON parsing on the relay path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_GEN_IDS = re.compile(rb'"token_ids":\s*\[([0-9,\s]*)\]')  # not "prompt_token_ids" (a `_` precedes it)
_PROMPT_IDS = re.compile(rb'"prompt_token_ids":\s*\[([0-9,\s]*)\]')
_STRIP = re.compile(rb',\s*"(?:prompt_)?token_ids":\s*(?:\[[0-9,\s]*\]|null)')


@dataclass
class StreamTokens:
    """What a relayed stream showed of its tokens: enough to continue it elsewhere."""

    strip: bool  # the router asked for the token ids; the client did not
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    head: bytes = b""  # the first event (its id, created, model name the continuation keeps)
    failovers: int = 0

    def observe(self, ev: bytes) -> bytes | None:
        """Record one SSE event's token ids; returns the event as the client should see it (None: not at all)."""
        if not self.head and ev.startswith(b"data: {"):
            self.head = ev
        if self.prompt_ids is None:
            m = _PROMPT_IDS.search(ev)
            if m:
                self.prompt_ids = _ints(m.group(1))
        m = _GEN_IDS.search(ev)
        if m:
            self.generated.extend(_ints(m.group(1)))
        if not self.strip or b"token_ids" not in ev:
            return ev
        ev = _STRIP.sub(b"", ev)
        # A token with no text yet: vLLM sends its chunk only because ids were asked for; without them the
        # client would not have seen it.
        if b'"delta":{}' in ev and b'"finish_reason":null' in ev and b'"usage"' not in ev:
            return None
        return ev


def _ints(raw: bytes) -> list[int]:
    return [int(x) for x in raw.split(b",") if x.strip()]
