"""Mid-stream failover: a decode worker that dies or stalls while streaming a round does not cut the
client's answer; the router continues the same stream on another decode worker.

Why it stays exact: the generate request asks the engine for token ids (vLLM's `return_token_ids`,
removed again from what the client sees unless it asked for them). When the stream breaks, the
continuation is a completion of the prompt's ids plus the ids generated so far, on another live decode
worker, with `max_tokens` reduced by what was generated. That worker computes the whole prefix itself (the
dead worker's KV is gone with it). Its events are rewritten into the client's format (chat or completion
chunks, the original id, usage counting the whole answer), so with greedy sampling the client reads
exactly what one uninterrupted run would have produced.

Not for requests a continuation cannot reproduce: several choices, logprobs, tools, structured output,
echo, suffix, logit bias, or presence/frequency penalties (they count generated tokens, which the
continuation sees as prompt). Those keep the old behaviour: an SSE error event ends the stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import orjson

from ampd_plugin.connector import params as wire
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router.ledger import KVLedger
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.stream_tokens import StreamTokens
from ampd_plugin.router.upstream import UpstreamTimeout, Upstreams, WorkerDown
from ampd_plugin.router_policy.registry import least_loaded_decode
from ampd_plugin.router_policy.state import ClusterState, WorkerState

log = logging.getLogger("ampd.router")

# Sampling fields a continuation carries over unchanged (everything else of the client's body is either
# re-derived, like max_tokens, or makes the request ineligible).
_CARRIED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
            "repetition_penalty", "skip_special_tokens", "spaces_between_special_tokens",
            "include_stop_str_in_output", "bad_words", "allowed_token_ids", "stream_options", "priority")
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions API's default, which vLLM follows


def why_not(body: dict, chat: bool) -> str | None:
    """Why a streamed request cannot be continued on another worker exactly (None: it can)."""
    if not body.get("stream"):
        return "not streamed"
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            return f"{name} > 1"
    for name in ("logprobs", "top_logprobs", "prompt_logprobs", "echo", "suffix", "logit_bias", "tools",
                 "functions", "response_format", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar", "structured_outputs"):
        value = body.get(name)
        if value not in (None, False, 0, "", [], {}) and not (name == "response_format" and _plain_text(value)):
            return name
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            return name
    if body.get("tool_choice") not in (None, "none"):
        return "tool_choice"
    return None


def _plain_text(fmt) -> bool:
    return isinstance(fmt, dict) and fmt.get("type") == "text"


@dataclass
class Continuation:
    """The stream that replaces a broken one: its response, worker and event rewriter."""

    resp: aiohttp.ClientResponse
    worker: WorkerState
    convert: Callable[[bytes], bytes | None]


class StreamFailover:
    def __init__(self, cluster: ClusterState, upstreams: Upstreams, ledger: KVLedger, metrics: RouterMetrics, *,
                 limit: int, kv_connector: str, stall_timeout_s: float,
                 suspect: Callable[[str], bool] = lambda wid: False,
                 mark_dead: Callable[[str, str], None] = lambda wid, why: None,
                 model: Callable[[], str | None] = lambda: None) -> None:
        self.cluster, self.upstreams, self.ledger, self.metrics = cluster, upstreams, ledger, metrics
        self.limit, self.kv_connector, self.suspect, self.model = limit, kv_connector, suspect, model
        self.mark_dead = mark_dead  # a continuation target that cannot be reached is out of routing
        self._timeout = upstreams.with_read_timeout(stall_timeout_s)

    def prepare(self, ctx: RoundCtx, body: dict) -> None:
        """Make a generate request continuable: ask for token ids (kept from the client unless it asked)."""
        if self.limit <= 0 or why_not(ctx.body, ctx.chat) is not None:
            return
        ctx.tokens = StreamTokens(strip=not body.get("return_token_ids"))
        body["return_token_ids"] = True

    async def resume(self, ctx: RoundCtx, failed: str, cause: str) -> Continuation | None:
        """A continuation of `ctx`'s broken stream on another decode worker, or None (the stream then ends
        with an error event). Tries each other live worker once, within the per-request limit."""
        tokens = ctx.tokens
        if tokens is None or (tokens.head and tokens.prompt_ids is None):
            # not continuable, or the engine sent events without the token ids it was asked for
            self.metrics.failovers.labels(failed, "not_continuable").inc()
            return None
        tried = {failed}
        while tokens.failovers < self.limit:
            target = self._pick(tried)
            if target is None:
                self.metrics.failovers.labels(failed, "no_worker").inc()
                log.warning("stream of %s broke on %s (%s); no other decode worker to continue it",
                            ctx.request_id, failed, cause)
                return None
            tried.add(target.worker_id)
            tokens.failovers += 1
            path, body, convert = self._request(ctx, tokens)
            try:
                resp = await self.upstreams.post(target.worker_id, path, orjson.dumps(body),
                                                 {"Content-Type": "application/json",
                                                  "X-Request-Id": f"{ctx.request_id}-f{tokens.failovers}"},
                                                 self._timeout)
            except (WorkerDown, UpstreamTimeout) as exc:
                if isinstance(exc, WorkerDown):
                    self.mark_dead(target.worker_id, exc.detail)
                log.warning("continuation of %s on %s failed: %s", ctx.request_id, target.worker_id, exc)
                continue
            if resp.status != 200:
                detail = (await resp.read())[:200]
                resp.release()
                log.warning("continuation of %s on %s answered %s: %r", ctx.request_id, target.worker_id,
                            resp.status, detail)
                continue
            self._move(ctx, target.worker_id, len(tokens.prompt_ids or ()) + len(tokens.generated))
            self.metrics.failovers.labels(failed, "continued").inc()
            log.warning("stream of %s broke on %s (%s); continued on %s after %d token(s)", ctx.request_id,
                        failed, cause, target.worker_id, len(tokens.generated))
            return Continuation(resp, target, convert)
        self.metrics.failovers.labels(failed, "limit").inc()
        return None

    def _pick(self, tried: set[str]) -> WorkerState | None:
        """The least-loaded live decode worker not tried yet, healthy ones first."""
        live = {w.worker_id: w for w in self.cluster.live_decode() if w.worker_id not in tried}
        healthy = {k: w for k, w in live.items() if not self.suspect(k)} or live
        if not healthy:
            return None
        wid = least_loaded_decode(ClusterState(prefill=self.cluster.prefill, decode=healthy,
                                               bindings=self.cluster.bindings))
        return healthy[wid] if wid else None

    def _move(self, ctx: RoundCtx, worker: str, tokens: int) -> None:
        """The round now decodes on `worker`: the session is bound there and its KV counts there."""
        s = ctx.session
        ctx.fallback = f"failover-from-{ctx.decode}"
        ctx.decode = worker
        if ctx.task is not None:
            ctx.task.decode_worker = worker
        if s.explicit:
            self.cluster.bindings[s.session_id] = worker
            self.metrics.rebinds.labels("failover").inc()
        self.ledger.begin(s, worker, tokens)

    def _request(self, ctx: RoundCtx, tokens: StreamTokens) -> tuple[str, dict, Callable[[bytes], bytes | None]]:
        """The continuation's path and body, and how its events become the client's."""
        kv = {"kv_transfer_params": wire.local_params(session=ctx.session_param)} if self.kv_connector == "ampd" else {}
        if tokens.prompt_ids is None:
            # Broken before its first event: nothing reached the client; run the client's request again.
            body = {**ctx.body, "return_token_ids": True, **kv}
            return ctx.generate_path, body, lambda ev: tokens.observe(ev)
        body = {k: ctx.body[k] for k in _CARRIED if k in ctx.body}
        body.update(model=ctx.body.get("model") or self.model(), prompt=tokens.prompt_ids + tokens.generated,
                    stream=True, return_token_ids=True, **kv)
        limit = ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens")
        if limit is None and not ctx.chat:
            limit = _COMPLETIONS_DEFAULT_MAX_TOKENS
        done = len(tokens.generated)
        if limit is not None:
            body["max_tokens"] = max(1, int(limit) - done)
        if ctx.body.get("min_tokens"):
            body["min_tokens"] = max(0, int(ctx.body["min_tokens"]) - done)
        return "/v1/completions", body, _Rewriter(ctx.chat, tokens, done).event


class _Rewriter:
    """Turns a continuation's completion events into the events the client's stream was made of."""

    def __init__(self, chat: bool, tokens: StreamTokens, done: int) -> None:
        self.chat, self.tokens, self.done = chat, tokens, done
        head = {}
        try:
            head = orjson.loads(tokens.head[tokens.head.index(b"{"):]) if tokens.head else {}
        except (ValueError, orjson.JSONDecodeError):
            pass
        self.id = head.get("id")
        self.created = head.get("created") or int(time.time())
        self.model = head.get("model")
        self.prompt_tokens = len(tokens.prompt_ids or ())

    def event(self, ev: bytes) -> bytes | None:
        if not ev.startswith(b"data: {"):
            return ev  # [DONE] and anything that is not a JSON event pass unchanged
        self.tokens.observe(ev)  # the continuation's ids count too (a second failover continues after them)
        try:
            doc = orjson.loads(ev[6:])
        except orjson.JSONDecodeError:
            return ev
        choices = doc.get("choices") or []
        out: dict = {"id": self.id or doc.get("id"), "object": "chat.completion.chunk" if self.chat else doc.get("object"),
                     "created": self.created, "model": self.model or doc.get("model")}
        if choices:
            ch = choices[0]
            text, finish = ch.get("text") or "", ch.get("finish_reason")
            if self.chat and not text and finish is None and self.tokens.strip:
                return None  # a token that decoded to nothing yet: chat streams send no such chunk
            if self.chat:
                choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if ch.get("stop_reason") is not None:
                choice["stop_reason"] = ch["stop_reason"]
            if not self.tokens.strip and ch.get("token_ids") is not None:
                choice["token_ids"] = ch["token_ids"]
            out["choices"] = [choice]
        else:
            out["choices"] = []
        usage = doc.get("usage")
        if isinstance(usage, dict):
            completion = int(usage.get("completion_tokens") or 0) + self.done
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                            "total_tokens": self.prompt_tokens + completion}
        return b"data: " + orjson.dumps(out)
