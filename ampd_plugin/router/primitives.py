"""Sub-request primitives (in the spirit of LLM microserving) and the routes built from them.

A round is executed as a short list of `Step`s, each one HTTP request to one engine:

- `read_kv(holder, tokens)`          — name KV a worker already holds (a session's history on its decode worker);
- `remote_send(worker, end, history)` — prefill `prompt[:end]` on `worker` (reading `history` first instead of
                                        recomputing it) and hold the KV for the next step to read;
- `prep_recv(source)`                — make the generating worker take KV from `source` (the previous step's
                                        holder, or `read_kv(...)`) before computing the rest itself;
- `start_generate(worker, begin, recv)` — compute `prompt[begin:]` on `worker` and decode (streamed to the client).

The wire format of every step comes from `ampd_plugin.connector.params` (never re-defined here). With the
`ampd` connector every transfer is a READ by the worker that needs the KV, so "receive" is a property of
the reading request rather than a separate call; `prep_recv` therefore shapes the generate step.

Each route and strategy below is a few lines on these primitives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ampd_plugin.connector import params as wire


@dataclass(frozen=True)
class KVRef:
    """KV of the first `tokens` prompt positions, held by `holder` (worker id)."""

    holder: str
    tokens: int


@dataclass(frozen=True)
class Recv:
    """Where the generating worker gets KV it lacks: the previous step (`from_previous`) or a `KVRef`."""

    from_previous: bool = False
    ref: KVRef | None = None


@dataclass
class Step:
    """One sub-request. `op` is "prefill" (max_tokens=1, held KV) or "generate" (the client's answer)."""

    op: Literal["prefill", "generate"]
    worker: str
    begin: int = 0  # tokens expected to be present (cached or received) before this step computes
    end: int | None = None  # prefill only prompt[:end] (token ids); None = the whole prompt
    history: KVRef | None = None  # prefill: read these tokens instead of recomputing them
    recv: Recv | None = None  # generate: KV to take from elsewhere first

    def kv_params(self, session: str | None, urls: Callable[[str], str], previous: dict | None,
                  xfer: Callable[[], str]) -> dict:
        """The `kv_transfer_params` of this step, built with the connector's builders (`xfer()` gives the
        round's transfer id; called only by steps that need one)."""
        if self.op == "prefill":
            h = self.history
            return wire.remote_prefill_params(
                xfer(),
                history_from=urls(h.holder) if h and h.tokens > 0 else None,
                history_tokens=h.tokens if h else 0,
                session=session,
            )
        if self.recv is None:
            return wire.local_params(session=session)
        if self.recv.from_previous:
            return wire.decode_params(previous or {}, session=session)
        ref = self.recv.ref
        return wire.migrate_params(xfer(), history_from=urls(ref.holder), history_tokens=ref.tokens, session=session)


@dataclass
class Plan:
    """The steps of one round, and the worker whose prefill queue (capacity) it waits for."""

    name: str
    steps: list[Step]
    queue_worker: str
    kv_tokens_moved: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def generate(self) -> Step:
        return self.steps[-1]


# ------------------------------------------------------------------------------------------ primitives
def read_kv(holder: str, tokens: int) -> KVRef | None:
    return KVRef(holder, tokens) if tokens > 0 else None


def remote_send(worker: str, *, end: int | None = None, history: KVRef | None = None) -> Step:
    return Step("prefill", worker, begin=history.tokens if history else 0, end=end, history=history)


def prep_recv(source: KVRef | None = None) -> Recv:
    return Recv(from_previous=source is None, ref=source)


def start_generate(worker: str, begin: int, recv: Recv | None = None) -> Step:
    return Step("generate", worker, begin=begin, recv=recv)


# ---------------------------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class RoundShape:
    """What a plan needs to know about the round: its decode worker and token counts."""

    decode: str
    prompt_tokens: int
    l_hist: int  # tokens of this prompt already resident on `decode`


def local_plan(r: RoundShape) -> Plan:
    """Prefill on the bound decode worker: its prefix cache holds the history; no KV moves."""
    return Plan("local", [start_generate(r.decode, begin=r.l_hist)], queue_worker=r.decode)


def remote_plan(r: RoundShape, prefill: str) -> Plan:
    """AMPD remote: P reads the history from D, computes the increment, D reads back only the increment."""
    steps = [remote_send(prefill, history=read_kv(r.decode, r.l_hist)),
             start_generate(r.decode, begin=r.prompt_tokens, recv=prep_recv())]
    return Plan("remote", steps, queue_worker=prefill, kv_tokens_moved=r.prompt_tokens)


def balanced_pd_plan(r: RoundShape, prefill: str, share: float) -> Plan:
    """Balanced PD: P prefills the first `share` of the prompt, D the rest (microserving's pd_balance)."""
    k = max(1, min(r.prompt_tokens - 1, int(share * r.prompt_tokens)))
    if k <= r.l_hist:  # D already holds more than P's share: nothing for P to do
        return local_plan(r)
    steps = [remote_send(prefill, end=k, history=read_kv(r.decode, r.l_hist)),
             start_generate(r.decode, begin=k, recv=prep_recv())]
    return Plan("balanced", steps, queue_worker=prefill, kv_tokens_moved=k, notes={"split": k})


def migration_plan(r: RoundShape, old_decode: str) -> Plan:
    """Context migration: the new decode worker reads the session's history from the old one, then runs
    the round locally — the session moves instead of losing its KV."""
    if r.l_hist <= 0:
        return local_plan(r)
    steps = [start_generate(r.decode, begin=r.l_hist, recv=prep_recv(read_kv(old_decode, r.l_hist)))]
    return Plan("migrate", steps, queue_worker=r.decode, kv_tokens_moved=r.l_hist, notes={"from": old_decode})
