"""One round from the client's request to the executor: session, prompt count, binding, plan, queue, retries.

Per round: identify the session, count the prompt (incrementally), bind the session to a decode worker
(policy.bind_session), pick a route (policy.route_prefill), turn it into sub-request steps
(`primitives`), wait for the chosen worker's prefill capacity in the router-held queue ordered by the
policy (`queues`), and hand the round to the `RoundExecutor`. Faults re-route instead of failing the
session: a dead decode worker's sessions are rebound and their next round is a full prefill elsewhere;
a dead prefill worker's work goes elsewhere or local.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

from starlette.responses import Response

from ampd_plugin.router import primitives as prim
from ampd_plugin.router.accounting import RoundAccounting
from ampd_plugin.router.config import RouterConfig
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.errors import RouterError, bad_request
from ampd_plugin.router.executor import RoundExecutor
from ampd_plugin.router.health import WorkerHealth
from ampd_plugin.router.history import reusable_tokens
from ampd_plugin.router.limits import prompt_chars
from ampd_plugin.router.planning import RoundPlanner
from ampd_plugin.router.ledger import KVLedger
from ampd_plugin.router.queues import PrefillQueues
from ampd_plugin.router.replication import Replication
from ampd_plugin.router.round_io import RoundIO
from ampd_plugin.router.session_lock import SessionLocks
from ampd_plugin.router.sessions import (SESSION_BODY_FIELDS, PromptCounter, SessionStore, SessionTableFull,
                                         session_identity)
from ampd_plugin.router.upstream import UpstreamTimeout, WorkerDown, WorkerFailed, upstream_error
from ampd_plugin.router_policy.state import ClusterState, PrefillTask

_MAX_ATTEMPTS = 3  # a round survives up to two dead workers before the client sees an error
_INLINE_TOKENIZE_CHARS = 8192  # longer new text is tokenized in a thread so relays keep flowing
_MAX_CHARS_PER_TOKEN = 32  # default character budget per allowed token: ordinary text averages ~4
_request_ids = itertools.count()


class RoundRunner:
    def __init__(self, cfg: RouterConfig, cluster: ClusterState, sessions: SessionStore, queues: PrefillQueues,
                 planner: RoundPlanner, executor: RoundExecutor, io: RoundIO, accounting: RoundAccounting,
                 health: WorkerHealth, counter: PromptCounter | None = None,
                 replication: Replication | None = None) -> None:
        self.cfg, self.cluster, self.sessions, self.queues = cfg, cluster, sessions, queues
        self.planner, self.executor, self.io, self.accounting, self.health = planner, executor, io, accounting, health
        self.replication = replication  # router replicas: the session's cross-replica lock and record
        self.counter = counter  # loaded at start-up when not given
        self.locks = SessionLocks(cfg.session_wait_s)
        # One thread: HF fast tokenizers must not be called concurrently (their Rust object is borrowed).
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ampd-tokenize")

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False)

    async def run(self, headers: Mapping[str, str], body: dict, chat: bool, t0: float) -> Response:
        sid, explicit = session_identity(headers, body)
        for name in SESSION_BODY_FIELDS:
            body.pop(name, None)
        body.pop("kv_transfer_params", None)  # transfers are the router's business, never the client's
        self._check_chars(body, chat)
        if not explicit:
            return await self._run(sid, False, body, chat, t0, headers, None)
        await self.locks.acquire(sid)  # one round of a session at a time (bounded wait, then 409)
        released = entered = False
        store = self.replication.store if self.replication is not None and self.replication.enabled else None

        def unlock() -> None:
            nonlocal released
            if not released:
                released = True
                if entered:
                    store.leave(sid)  # queued after the round's record write
                self.locks.release(sid)

        try:
            record = None
            if store is not None:  # and across replicas: the same bounded wait, counted from arrival
                record = await store.enter(sid, max(0.0, self.cfg.session_wait_s - (time.monotonic() - t0)))
                entered = True
            return await self._run(sid, True, body, chat, t0, headers, unlock, record)
        except BaseException:
            unlock()  # failed before a relay took the round over (a relay is only made at the very end)
            raise

    def _check_chars(self, body: dict, chat: bool) -> None:
        """Refuse prompt text over the character budget before the template render and the tokenizer pay for it."""
        limit = self.cfg.max_prompt_tokens
        budget = self.cfg.max_prompt_chars or (limit * _MAX_CHARS_PER_TOKEN if limit else None)
        chars = prompt_chars(body, chat)
        if budget and chars > budget:
            raise bad_request(f"the prompt has {chars} characters; this router accepts at most {budget}",
                              "context_length_exceeded", "messages" if chat else "prompt")

    async def _run(self, sid: str, explicit: bool, body: dict, chat: bool, t0: float,
                   headers: Mapping[str, str], unlock, record=None) -> Response:
        field = "messages" if chat else "prompt"
        limit = self.cfg.max_prompt_tokens
        # A refused request leaves nothing behind: the session is admitted and remembers the prompt only
        # once the prompt passed every check.
        session = self.sessions.get(sid, explicit, admit=False)
        if explicit and self.replication is not None:
            self.replication.merge(session, record)
        counter = self.counter or PromptCounter(None)
        prompt = counter.render(body, chat)
        extends = isinstance(prompt, str) and bool(session.last_text) and prompt.startswith(session.last_text)
        new_chars = len(prompt) - (len(session.last_text) if extends else 0) if isinstance(prompt, str) else 0
        if new_chars > _INLINE_TOKENIZE_CHARS:  # long text: tokenize off the event loop (Rust releases the GIL)
            n = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, counter.count, prompt, session, False)
        else:
            n = counter.count(prompt, session, remember=False)
        if n <= 0:
            raise bad_request("the prompt is empty", "empty_prompt", field)
        if limit and n >= limit:
            raise bad_request(f"the prompt has {n} tokens; this model's context is {limit}",
                              "context_length_exceeded", field)
        reusable = await self._reusable(session, prompt, counter) if session.resident_tokens else None
        counter.remember(session, prompt, n)
        try:
            self.sessions.admit(session)
        except SessionTableFull:
            raise RouterError(503, f"the router is serving {self.cfg.max_sessions} sessions at once (max_sessions); "
                              "retry shortly", "too_many_sessions") from None
        if reusable == 0 and session.resident_tokens:
            # the client rewrote history: nothing the worker holds is a prefix of the new prompt
            self.accounting.ledger.settle(session, None, 0)
        ctx = RoundCtx(session, chat, body, body.get("stream") is True, prompt, n, t0,
                       headers.get("x-request-id") or f"ampd-{next(_request_ids)}")
        ctx.reusable = reusable
        ctx.output = [] if explicit else None  # the generated text: the next round compares with it
        ctx.end_round = unlock  # the relay calls it when a streamed round ends, else the `finally` below
        session.busy = True
        try:
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    return await self._attempt(ctx)
                except WorkerDown as exc:
                    self.health.mark_dead(exc.worker_id, exc.detail)
                    self.io.release(ctx)
                    ctx.fallback = f"retry-after-{exc.worker_id}-down"
                    if attempt == _MAX_ATTEMPTS - 1 or not self.cluster.live_decode():
                        raise RouterError(503, "no live engine could serve the request", "no_worker") from None
                except WorkerFailed as exc:
                    # The decode worker answered 5xx before any byte reached the client: move the session
                    # off it (binding avoids suspect workers) and run the round again, with a full prefill.
                    self.io.release(ctx)
                    ctx.fallback = f"retry-after-{exc.worker_id}-{exc.status}"
                    if self.cluster.bindings.get(session.session_id) == exc.worker_id:
                        self.cluster.unbind_session(session.session_id)
                        self.accounting.ledger.settle(session, None, 0)
                    others = [w for w in self.cluster.live_decode() if w.worker_id != exc.worker_id]
                    if attempt == _MAX_ATTEMPTS - 1 or not others:
                        raise upstream_error(exc.status, exc.data) from None
                except UpstreamTimeout as exc:
                    self.io.release(ctx)
                    others = [w for w in self.cluster.live_decode() if w.worker_id != exc.worker_id]
                    if ctx.stream and others and attempt < _MAX_ATTEMPTS - 1:
                        # A stream whose worker stayed silent for stall_timeout_s before its first byte
                        # (hung, not dead): nothing reached the client, so the round runs elsewhere.
                        ctx.fallback = f"retry-after-{exc.worker_id}-stall"
                        if self.cluster.bindings.get(session.session_id) == exc.worker_id:
                            self.cluster.unbind_session(session.session_id)
                            self.accounting.ledger.settle(session, None, 0)
                        continue
                    self.accounting.finish(ctx, t_first=None, t_last=None, n_out=0, ok=False)
                    raise RouterError(504, f"the engine ({exc.worker_id}) did not answer in time", "upstream_timeout") from None
            raise AssertionError("unreachable")
        finally:
            if not ctx.stream or not ctx.relay_started:
                ctx.finish_session_round()
                # Every way out (error, client cancel, timeout, an engine's 4xx) settles the round once:
                # its in-flight KV, an anonymous session's binding and its metrics are owned by `finish`.
                if not ctx.accounted:
                    self.accounting.finish(ctx, t_first=None, t_last=None, n_out=0, ok=False)

    async def _reusable(self, s, prompt, counter: PromptCounter) -> int | None:
        """`history.reusable_tokens`, off the event loop when it has much text to tokenize."""
        if isinstance(prompt, str) and len(prompt) - len(s.last_text) > _INLINE_TOKENIZE_CHARS \
                and not prompt.startswith(s.last_text):
            return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, reusable_tokens, s, prompt, counter)
        return reusable_tokens(s, prompt, counter)

    async def _attempt(self, ctx: RoundCtx) -> Response:
        ctx.new_attempt()
        now = time.monotonic()
        self.cluster.now = now
        s = ctx.session
        decode = self.cluster.bindings.get(s.session_id)
        if decode is None or not self.cluster.decode[decode].alive:
            decode = self.planner.bind(s, ctx.prompt_tokens, "first-round" if s.rounds == 0 else "rebind")
        l_hist = min(self.accounting.ledger.history(s, decode), ctx.prompt_tokens - 1)
        if ctx.reusable is not None:  # only the longest common prefix of what it holds and the prompt
            l_hist = min(l_hist, ctx.reusable)
        task = PrefillTask(s.session_id, s.rounds, max(0, l_hist), ctx.prompt_tokens - max(0, l_hist), now, decode)
        ctx.task, ctx.decode, ctx.released = task, decode, False
        shape = prim.RoundShape(decode, ctx.prompt_tokens, task.l_hist)
        ctx.plan, ctx.route = self.planner.plan(ctx, task, shape, self.counter or PromptCounter(None))
        self.accounting.ledger.begin(s, ctx.decode, ctx.prompt_tokens)  # in-flight KV counts from dispatch
        await self.queues.acquire(ctx.plan.queue_worker, task)
        task.started_at = time.monotonic()
        ctx.queue_wait = task.started_at - now
        try:
            return await self.executor.execute(ctx)
        except BaseException:
            self.io.release(ctx)
            raise
