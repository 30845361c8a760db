"""What the router knows about one round while it runs (`RoundCtx`), shared by every piece of a round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ampd_plugin.connector import params as wire
from ampd_plugin.router import primitives as prim
from ampd_plugin.router.sessions import Session
from ampd_plugin.router.stream_tokens import StreamTokens
from ampd_plugin.router_policy.state import PrefillTask, Route


@dataclass
class RoundCtx:
    """Everything known about one round while it runs."""

    session: Session
    chat: bool
    body: dict
    stream: bool
    prompt: str | list[int]
    prompt_tokens: int
    t0: float
    request_id: str
    task: PrefillTask | None = None
    route: Route | None = None
    plan: prim.Plan | None = None
    decode: str = ""
    queue_wait: float = 0.0
    released: bool = False  # the round's prefill slot went back to its queue
    fallback: str = ""
    token_ids: list[int] | None = None
    xfer: str | None = None  # this attempt's KV transfer id, made when a step first needs one
    prefill_done: float | None = None  # when the remote prefill answered (a non-streaming round's TTFT)
    relay_started: bool = False  # a streaming relay owns the session's busy flag from here on
    # The prefill worker whose prefill the generating worker actually used; None = the generating worker
    # prefilled itself (local plans, and remote plans that fell back to local).
    prefilled_on: str | None = None
    ttft: float | None = None  # set once, when the first token reaches the router
    ttft_source: str = ""  # "stream" (first token event), "prefill" (P's answer), "predicted" (local, non-streaming)
    end_round: Callable[[], None] | None = None  # frees the session for its next round (called once)
    accounted: bool = False  # `RoundAccounting.finish` ran for this round (exactly once)
    recomputed: int = 0  # history tokens the holder reported recomputing for this round's export
    reusable: int | None = None  # tokens of the prompt the decode worker may hold (None: all it holds)
    output: list[str] | None = None  # the generated text, collected for named sessions (bounded)
    tokens: StreamTokens | None = None  # a continuable stream's token ids (router/failover.py)

    @property
    def failovers(self) -> int:
        return self.tokens.failovers if self.tokens is not None else 0

    def new_attempt(self) -> None:
        """A retry is a new transfer with a new prefill."""
        self.xfer = None
        self.prefill_done = None
        self.prefilled_on = None
        self.ttft, self.ttft_source = None, ""

    @property
    def prefiller(self) -> str:
        """The worker a TTFT sample belongs to: the prefill worker used, else the generating decode worker."""
        return self.prefilled_on or self.decode

    def finish_session_round(self) -> None:
        """Release the session (its next round may start); idempotent."""
        self.session.busy = False
        done, self.end_round = self.end_round, None
        if done is not None:
            done()

    def xfer_id(self) -> str:
        if self.xfer is None:
            self.xfer = wire.new_xfer_id()
        return self.xfer

    @property
    def session_param(self) -> str | None:
        """The session id the engines key their KV holds by (anonymous one-round sessions have none)."""
        return self.session.session_id if self.session.explicit else None

    @property
    def generate_path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"
