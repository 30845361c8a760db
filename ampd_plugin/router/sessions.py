"""Session identity and incremental prompt-length counting.

Identity, first match wins: the `X-Session-ID` header, a `session_id` body field, a `conversation_id`
body field (vLLM's multi-turn benchmark convention), the OpenAI `user` field. A request with none of them is a one-round session: it is routed like any first round and
forgotten when it ends.

Why a local tokenizer (not the engine's `/tokenize`): the router needs `l_hist`/`l_incr` *before* it
picks a worker, on every round; an extra HTTP round trip to an engine API server per round costs about
0.5 ms and doubles that server's per-request work (vllm-router's cache_aware `/render` call, measured in
`router_anchor.md`). Loading the engine's own tokenizer files and chat template gives the same token
count with no network. To keep the cost per round proportional to the *new* text only, each session
remembers its last rendered prompt and its token count; a new prompt that extends it is counted as
`old count + tokens(new suffix)` (exact up to a merge across the seam, which only the cost model sees).
Without a tokenizer the router falls back to ~4 bytes per token and says so at start-up.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ampd_plugin.router import session_ids

log = logging.getLogger("ampd.router")

SESSION_HEADER = "x-session-id"
SESSION_FIELD = "session_id"
CONVERSATION_FIELD = "conversation_id"  # vLLM's multi-turn benchmark client and proxy send this
SESSION_BODY_FIELDS = (SESSION_FIELD, CONVERSATION_FIELD)  # removed before the request reaches an engine
_RESERVED_TEMPLATE_KWARGS = ("tokenize", "add_generation_prompt", "conversation", "messages", "tools", "return_dict")
_RUN = uuid.uuid4().hex[:8]  # anonymous ids are unique per router process without a uuid per request
_anonymous = itertools.count()


def session_identity(headers: Mapping[str, str], body: dict) -> tuple[str, bool]:
    """(session id, explicit?) for a request; anonymous requests get a fresh one-round id.

    An id that is not a plain token is refused (400) unless it came from the OpenAI `user` field, which is
    replaced by its digest (see `session_ids`)."""
    named = ((headers.get(SESSION_HEADER), "header X-Session-ID"), (body.get(SESSION_FIELD), SESSION_FIELD),
             (body.get(CONVERSATION_FIELD), CONVERSATION_FIELD))
    for candidate, source in named:
        sid = _as_text(candidate)
        if sid:
            return session_ids.checked(sid, source), True
    user = _as_text(body.get("user"))
    if user:
        return session_ids.from_user_field(user), True
    return f"anon-{_RUN}-{next(_anonymous)}", False


def _as_text(value: Any) -> str:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value).strip()
    return ""


@dataclass
class Session:
    """What the router remembers between rounds of one session."""

    session_id: str
    explicit: bool
    rounds: int = 0
    resident_tokens: int = 0  # KV tokens of this session on its bound decode worker (prompt + output)
    resident_worker: str | None = None  # the decode worker holding them
    last_text: str = ""  # rendered prompt of the last round (for incremental counting)
    last_text_tokens: int = 0
    last_output: str = ""  # the last round's generated text: with `last_text`, what the decode worker holds
    last_seen: float = field(default_factory=time.monotonic)
    busy: bool = False  # a round is in flight (rounds of one session are serial)
    # Router replicas (router/replication.py): the version of the shared record this copy reflects, and,
    # when another replica served the last round, what it rendered (length, digest, tokens) and what the
    # decode worker holds (length and digest of prompt + output) in place of the texts themselves.
    synced_version: int = 0
    record_owner: bool = False  # this replica wrote that version (it can resend it after an outage)
    remote_prefix: tuple[int, str, int] | None = None
    remote_held: tuple[int, str] | None = None


def text_digest(text: str) -> str:
    """A short digest of `text`: replicas compare prompts by it instead of shipping them."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def extends_remote(prompt: str, known: tuple | None) -> bool:
    """`prompt` starts with the text another replica described as (length, digest, …)."""
    return known is not None and len(prompt) >= known[0] and text_digest(prompt[:known[0]]) == known[1]


class SessionTableFull(Exception):
    """Every remembered session is in the middle of a round: a new one cannot be admitted."""


class SessionStore:
    """Sessions by id, least recently used first, bounded three ways: an idle TTL, a cap on the number of
    sessions (the least recently used idle one is forgotten for a new one) and a cap on the prompt text
    kept for incremental counting (the least recently used sessions keep digests of it instead, as when
    another replica served them: their next round is counted in full, their KV is still reused).

    `on_evict(session)` is told of every session forgotten for the cap (its binding and KV accounting go)."""

    def __init__(self, ttl_s: float, max_sessions: int = 100_000, max_text_chars: int = 256 * 2**20) -> None:
        self.ttl_s, self.max_sessions, self.max_text_chars = ttl_s, max_sessions, max_text_chars
        self._sessions: dict[str, Session] = {}
        self.on_evict: Callable[[Session], None] | None = None
        self.evicted = 0  # sessions forgotten for the count cap
        self.shed = 0  # sessions whose texts were replaced by digests for the text cap
        self._chars_bound = 0  # an upper bound of the stored text (exact after each `stored_chars` call)

    def get(self, session_id: str, explicit: bool, admit: bool = True) -> Session:
        """The session with this id; a new one is stored now (`admit`) or when `admit(session)` is called."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            session = Session(session_id, explicit)
            if admit:
                self.admit(session)
        else:
            self._sessions[session_id] = session  # most recently used last
        session.last_seen = time.monotonic()
        return session

    def peek(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def admit(self, session: Session) -> None:
        """Remember a named session from now on (anonymous one-round sessions are never stored); called
        once per accepted round, after the session took its new prompt."""
        if not session.explicit:
            return
        if session.session_id not in self._sessions:
            if len(self._sessions) >= self.max_sessions:
                self._evict_one()
            self._sessions[session.session_id] = session
        self._chars_bound += len(session.last_text) + len(session.last_output)
        if self._chars_bound > self.max_text_chars and self.stored_chars() > self.max_text_chars:
            self._shed_texts(keep=session)

    def stored_chars(self) -> int:
        """Characters of prompt and output text kept (exact; resets the running bound)."""
        self._chars_bound = sum(len(s.last_text) + len(s.last_output) for s in self._sessions.values())
        return self._chars_bound

    def _evict_one(self) -> None:
        victim = next((s for s in self._sessions.values() if not s.busy), None)
        if victim is None:
            raise SessionTableFull(f"all {len(self._sessions)} remembered sessions are busy")
        del self._sessions[victim.session_id]
        self.evicted += 1
        if self.on_evict is not None:
            self.on_evict(victim)

    def _shed_texts(self, keep: Session) -> None:
        """Replace the least recently used sessions' texts by digests until 90 % of the cap is left."""
        target = int(self.max_text_chars * 0.9)
        for s in list(self._sessions.values()):
            if self._chars_bound <= target:
                break
            if s is keep or not (s.last_text or s.last_output):
                continue
            held = s.last_text + s.last_output
            s.remote_prefix = (len(s.last_text), text_digest(s.last_text), s.last_text_tokens)
            s.remote_held = (len(held), text_digest(held))
            self._chars_bound -= len(held)
            s.last_text = s.last_output = ""
            self.shed += 1

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def expire(self, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        gone = [s for s in self._sessions.values() if not s.busy and now - s.last_seen > self.ttl_s]
        for s in gone:
            del self._sessions[s.session_id]
        return gone

    def on_worker_lost(self, worker_id: str) -> list[Session]:
        """A decode worker died: its sessions keep their identity but lose their resident history."""
        lost = [s for s in self._sessions.values() if s.resident_worker == worker_id]
        for s in lost:
            s.resident_tokens = 0
            s.resident_worker = None
        return lost


class PromptCounter:
    """Renders a request the way the engine will and counts its tokens, incrementally per session."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.exact = tokenizer is not None
        # The Rust tokenizer behind a transformers "fast" tokenizer: the same encode vLLM runs, without
        # the Python wrapper's per-call overhead.
        backend = getattr(tokenizer, "_tokenizer", None)
        self._encode = getattr(backend, "encode", None)
        batch_fast = getattr(backend, "encode_batch_fast", None)  # tokenizers ≥ 0.21: no offsets, ~30% faster
        self._count_fast = (lambda text: len(batch_fast([text], add_special_tokens=False)[0].ids)) if batch_fast else None

    @classmethod
    def load(cls, name_or_path: str | None) -> "PromptCounter":
        if not name_or_path:
            log.warning("no tokenizer: prompt lengths are estimated at ~4 bytes/token (pass --tokenizer for exact counts)")
            return cls(None)
        try:
            # PreTrainedTokenizerFast: the same Rust tokenizer and chat-template rendering as the model's own
            # class, without AutoTokenizer's model-config probing, which imports torch (+1 GB RSS, and a
            # 90 ms full-GC pause over its objects). Slow-only tokenizers (no tokenizer.json) fall back.
            from transformers import PreTrainedTokenizerFast

            try:
                tok = PreTrainedTokenizerFast.from_pretrained(name_or_path, local_files_only=True)
            except Exception:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            log.info("tokenizer loaded from %s", name_or_path)
            return cls(tok)
        except Exception as exc:  # a missing or broken tokenizer must not stop the router
            log.warning("could not load tokenizer %r (%s); estimating ~4 bytes/token", name_or_path, exc)
            return cls(None)

    def render(self, body: dict, chat: bool) -> str | list[int]:
        """The prompt text the engine will tokenize, or the token ids the client already sent."""
        if not chat:
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                if prompt and all(isinstance(t, int) for t in prompt):
                    return prompt
                return "".join(p if isinstance(p, str) else "" for p in prompt)
            return prompt if isinstance(prompt, str) else ""
        messages = body["messages"]
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            try:
                kwargs = {}
                if body.get("tools"):
                    kwargs["tools"] = body["tools"]
                extra = body.get("chat_template_kwargs")
                if isinstance(extra, dict):  # the template's own switches, as the engine renders them
                    kwargs.update({k: v for k, v in extra.items() if k not in _RESERVED_TEMPLATE_KWARGS})
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True), **kwargs
                )
            except Exception as exc:  # templates differ; counting must never fail a request
                log.debug("chat template failed (%s); counting plain message text", session_ids.for_log(exc))
        return "".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}\n" for m in messages)

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        if self.tokenizer is None:
            return max(1, len(text.encode("utf-8", "ignore")) // 4)
        if self._count_fast is not None:
            return self._count_fast(text)
        if self._encode is not None:
            return len(self._encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_ids(self, prompt: str | list[int]) -> list[int] | None:
        """Exact ids (balanced PD needs them); None without a tokenizer."""
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            return None
        if self._encode is not None:
            return list(self._encode(prompt, add_special_tokens=False).ids)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def count(self, prompt: str | list[int], session: Session | None = None, remember: bool = True) -> int:
        """Tokens of `prompt`, counting only the part that extends the session's last prompt.

        `remember`: the session keeps `prompt` as its last prompt now (else call `remember` once accepted).
        """
        if isinstance(prompt, list):
            return len(prompt)
        if session is not None and session.last_text and prompt.startswith(session.last_text):
            n = session.last_text_tokens + self.count_text(prompt[len(session.last_text):])
        elif session is not None and not session.last_text and extends_remote(prompt, session.remote_prefix):
            n = session.remote_prefix[2] + self.count_text(prompt[session.remote_prefix[0]:])
        else:
            n = self.count_text(prompt)
        if remember and session is not None:
            self.remember(session, prompt, n)
        return n

    @staticmethod
    def remember(session: Session, prompt: str | list[int], n: int) -> None:
        """The session's last prompt and its count (named sessions only: the next round counts its increment)."""
        if session.explicit and isinstance(prompt, str):
            session.last_text, session.last_text_tokens = prompt, n
            session.remote_prefix = session.remote_held = None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
