"""Router replicas sharing one deployment's state through Redis (`ampd-plugin route --state redis://…`).

The distributed part is Redis's, not ours: every key has a TTL, the session lock is Redis's documented
single-instance lock (SET NX PX with a random token; release and renewal compare the token in a Lua
script), records are plain strings written under that lock (so no write is lost to a concurrent round),
and the events are one capped stream that every replica reads.

    {prefix}:s:{session}   the session's record (JSON), TTL = the router's session TTL
    {prefix}:l:{session}   the session lock (token), TTL = lock_ttl_s, renewed every heartbeat while held
    {prefix}:ev            the event stream (XADD MAXLEN ~ max_stream), read with XREAD BLOCK
    {prefix}:replicas      live replicas: sorted set of replica id -> last heartbeat (wall clock)

Nothing on the hot path waits for Redis except `enter` (one round trip: a script takes the lock and reads
the record). Record writes, unlocks and events go into bounded buffers that one writer task sends as one
script call per flush (the events of a flush are one stream entry); writes are coalesced per session (the
newest wins) and kept while Redis is down, so when it comes back the records are resynchronised. Both
scripts are sent by SHA (redis-py loads them again after a Redis restart). While Redis is unreachable the router serves from its local state: `enter` takes only
the in-process lock, events are dropped (counted), `/health` and `ampd_router_state_connected` say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import orjson

from ampd_plugin.router.errors import RouterError
from ampd_plugin.router.state_store import Event, SessionRecord

log = logging.getLogger("ampd.router.state")

PASSWORD_ENV = "AMPD_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "AMPD_REDIS_PASSWORD_FILE"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
# One round trip to enter a session: take its lock (SET NX PX) and, if taken, read its record.
_ENTER = ("if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
          "return {1, redis.call('get', KEYS[2])} end return {0}")
# One round trip per flush. KEYS: n record keys, then m lock keys, then the stream.
# ARGV: n, m, the replica id, the stream's MAXLEN, the event bundle ('' = none), then (record, version, TTL ms)
# per record, then one token per lock. Records are written under the session lock, so versions only grow;
# after an outage two replicas may both resend one session's record: the higher version wins, whichever
# arrives last. Records go before the unlocks, so an unlock never overtakes its write.
_COMMIT = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, n do
  local payload, version, ttl = ARGV[3 + 3 * i], tonumber(ARGV[4 + 3 * i]), ARGV[5 + 3 * i]
  local cur = redis.call('get', KEYS[i])
  local newer = true
  if cur then
    local ok, old = pcall(cjson.decode, cur)
    if ok and type(old) == 'table' and tonumber(old['version']) and tonumber(old['version']) >= version then
      newer = false
    end
  end
  if newer then redis.call('set', KEYS[i], payload, 'PX', ttl) end
end
for j = 1, m do
  if redis.call('get', KEYS[n + j]) == ARGV[5 + 3 * n + j] then redis.call('del', KEYS[n + j]) end
end
if ARGV[5] ~= '' then
  redis.call('xadd', KEYS[n + m + 1], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[3], 'd', ARGV[5])
end
return n + m
"""
_MAX_BATCH = 256  # records + unlocks per script call: keeps each call short for Redis's single thread
_RECORD_FIELDS = {f.name for f in dataclasses.fields(SessionRecord)}
_EVENT_KINDS = ("ttft", "itl", "kv")


def redacted_url(url: str) -> str:
    """The URL without its password (for logs and /health)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':' if parts.username else ':'}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> None:
    """A usable `--state` URL: redis://, rediss:// or unix://, and no password in it (argv is world-readable)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"--state {redacted_url(url)!r}: expected redis://HOST:PORT/DB, rediss://… or unix://PATH")
    if parts.password:
        raise ValueError(f"--state: do not put the Redis password in the URL (every local user can read the command "
                         f"line); set env {PASSWORD_ENV} or {PASSWORD_FILE_ENV}")


def password_from_env() -> str | None:
    path = os.environ.get(PASSWORD_FILE_ENV)
    if path:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None
    return os.environ.get(PASSWORD_ENV) or None


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class RedisStore:
    backend = "redis"

    def __init__(self, url: str, prefix: str = "ampd", replica_id: str | None = None, lock_ttl_s: float = 15.0,
                 heartbeat_s: float = 1.0, op_timeout_s: float = 1.0, max_events: int = 10_000,
                 max_pending_writes: int = 100_000, max_stream: int = 100_000, flush_window_s: float = 0.002) -> None:
        try:
            from redis import asyncio as aioredis
            from redis.exceptions import RedisError
        except ImportError:
            raise ValueError("--state redis://… needs redis-py: pip install 'ampd-plugin[router]' (or redis>=5)") from None
        check_url(url)
        self.url = redacted_url(url)
        self.prefix = prefix
        self.replica_id = replica_id or default_replica_id()
        self.lock_ttl_ms = max(1000, int(lock_ttl_s * 1000))
        self.heartbeat_s = heartbeat_s
        self.flush_window_s = flush_window_s
        self.max_pending_writes, self.max_stream = max_pending_writes, max_stream
        password = password_from_env()
        common = dict(password=password, socket_connect_timeout=op_timeout_s, retry_on_timeout=False)
        self._redis = aioredis.from_url(url, socket_timeout=op_timeout_s, **common)
        # The blocking XREAD waits up to one heartbeat: its own connection, with a longer read timeout.
        self._reader = aioredis.from_url(url, socket_timeout=heartbeat_s + op_timeout_s, **common)
        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        self._enter_script = self._redis.register_script(_ENTER)
        self._commit_script = self._redis.register_script(_COMMIT)
        self.connected = False
        self._held: dict[str, str] = {}  # session -> lock token, for locks this replica holds
        self._writes: dict[str, tuple[bytes, int, int]] = {}  # session -> (record JSON, version, TTL ms)
        self._unlocks: dict[str, str] = {}  # session -> token, sent after the writes queued before them
        self._events: deque[bytes] = deque(maxlen=max_events)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._on_event: Callable[[Event], None] = lambda e: None
        self._on_resync: Callable[[], None] = lambda: None
        self._last_id: bytes | str | None = None
        self._replicas = 1
        self._down_since: float | None = None
        self.dropped_events = 0  # not sent (Redis down, or the buffer was full)
        self.dropped_writes = 0  # records not kept while Redis was down (beyond max_pending_writes)
        self.applied_events = 0
        self.bad_events = 0
        self.resyncs = 0

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self, on_event: Callable[[Event], None], on_resync: Callable[[], None] | None = None) -> None:
        self._on_event = on_event
        self._on_resync = on_resync or (lambda: None)
        try:
            await self._beat()
        except self._errors as exc:
            self._mark_down(exc)
        if not self.connected:
            log.warning("state store %s unreachable at start-up: serving from local state until it answers", self.url)
        else:
            log.info("state store %s: replica %s, %d replica(s) live", self.url, self.replica_id, self._replicas)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat_loop()), loop.create_task(self._writer_loop()),
                       loop.create_task(self._reader_loop())]

    async def stop(self) -> None:
        """Flush what is pending (bounded), leave the replica set, close the connections."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.connected:
            self._unlocks.update(self._held)
            self._held.clear()
            with contextlib.suppress(*self._errors):
                await asyncio.wait_for(self._flush(), 2.0)
            with contextlib.suppress(*self._errors):
                await asyncio.wait_for(self._redis.zrem(self._key("replicas"), self.replica_id), 1.0)
        for client in (self._redis, self._reader):
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------------------ the StateStore API
    async def enter(self, session_id: str, wait_s: float) -> SessionRecord | None:
        if session_id in self._unlocks:  # our own unlock is not sent yet: the lock, and the newest record, are ours
            self._held[session_id] = self._unlocks.pop(session_id)
            return None
        if not self.connected:
            return None
        token = secrets.token_hex(8)
        lock, rec = self._key("l", session_id), self._key("s", session_id)
        deadline = time.monotonic() + max(0.0, wait_s)
        delay = 0.005
        while True:
            try:
                got = await self._enter_script(keys=[lock, rec], args=[token, self.lock_ttl_ms])
            except self._errors as exc:
                self._mark_down(exc)
                return None
            if got and got[0] == 1:
                self._held[session_id] = token
                return _record(got[1] if len(got) > 1 else None)
            if time.monotonic() + delay > deadline:
                raise RouterError(409, f"another round of session {session_id!r} is still running (on another router "
                                       "replica); send the next round when it has finished", "session_busy")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def leave(self, session_id: str) -> None:
        token = self._held.pop(session_id, None)
        if token is not None:
            self._unlocks[session_id] = token
            self._wake.set()

    def write(self, session_id: str, record: SessionRecord, ttl_s: float) -> None:
        self._writes.pop(session_id, None)  # re-inserted last: the oldest pending write is dropped first
        self._writes[session_id] = (orjson.dumps(record), record.version, max(1000, int(ttl_s * 1000)))
        while len(self._writes) > self.max_pending_writes:
            self._writes.pop(next(iter(self._writes)))
            self.dropped_writes += 1
        self._wake.set()

    def publish(self, event: Event) -> None:
        if not self.connected:
            self.dropped_events += 1
            return
        if len(self._events) == self._events.maxlen:
            self.dropped_events += 1
        self._events.append(orjson.dumps(event))  # orjson encodes dataclasses natively (asdict is slow)
        self._wake.set()

    def replicas(self) -> int:
        return self._replicas

    def status(self) -> dict[str, Any]:
        return {"backend": "redis", "url": self.url, "connected": self.connected, "replica_id": self.replica_id,
                "replicas": self._replicas, "pending_writes": len(self._writes), "locks_held": len(self._held),
                "dropped_events": self.dropped_events, "dropped_writes": self.dropped_writes,
                "down_for_s": round(time.monotonic() - self._down_since, 1) if self._down_since is not None else None,
                "resyncs": self.resyncs}

    # ------------------------------------------------------------------------------ background work
    def _key(self, kind: str, session_id: str = "") -> str:
        return f"{self.prefix}:{kind}:{session_id}" if session_id else f"{self.prefix}:{kind}"

    async def _beat(self) -> None:
        """Heartbeat: announce this replica, prune dead ones, count them, renew held locks."""
        now = time.time()
        key = self._key("replicas")
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(key, {self.replica_id: now})
        pipe.zremrangebyscore(key, "-inf", now - 5 * self.heartbeat_s)
        pipe.zcard(key)
        pipe.pexpire(key, int(60_000 + 10_000 * self.heartbeat_s))
        for sid, token in list(self._held.items()):
            pipe.eval(_RENEW, 1, self._key("l", sid), token, self.lock_ttl_ms)
        results = await pipe.execute()
        self._replicas = max(1, int(results[2]))
        if not self.connected:
            self._mark_up()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except self._errors as exc:
                self._mark_down(exc)

    async def _writer_loop(self) -> None:
        while True:
            await self._wake.wait()
            # A short gather window: a round's records, unlock and events (and other rounds') go in one call
            await asyncio.sleep(self.flush_window_s)
            self._wake.clear()
            if self.connected:
                try:
                    await self._flush()
                except self._errors as exc:
                    self._mark_down(exc)

    async def _flush(self) -> None:
        writes, self._writes = self._writes, {}
        unlocks, self._unlocks = self._unlocks, {}
        events = list(self._events)
        self._events.clear()
        if not (writes or unlocks or events):
            return
        try:
            items = [("w", sid, w) for sid, w in writes.items()] + [("u", sid, t) for sid, t in unlocks.items()]
            bundle = b"[" + b",".join(events) + b"]" if events else b""
            for start in range(0, max(1, len(items)), _MAX_BATCH):
                await self._commit(items[start:start + _MAX_BATCH], bundle if start == 0 else b"")
        except BaseException:
            for sid, w in writes.items():  # kept for the resync; a newer write of the session wins
                self._writes.setdefault(sid, w)
            for sid, token in unlocks.items():  # a compare-and-delete is safe to send again
                self._unlocks.setdefault(sid, token)
            self.dropped_events += len(events)
            raise

    async def _commit(self, items: list[tuple[str, str, Any]], bundle: bytes) -> None:
        recs = [(sid, w) for kind, sid, w in items if kind == "w"]
        locks = [(sid, t) for kind, sid, t in items if kind == "u"]
        keys = [self._key("s", sid) for sid, _ in recs] + [self._key("l", sid) for sid, _ in locks] + [self._key("ev")]
        args: list[Any] = [len(recs), len(locks), self.replica_id, self.max_stream, bundle]
        for _sid, (payload, version, ttl_ms) in recs:
            args += [payload, version, ttl_ms]
        args += [token for _sid, token in locks]
        await self._commit_script(keys=keys, args=args)

    async def _reader_loop(self) -> None:
        me = self.replica_id.encode()
        stream = self._key("ev")
        while True:
            try:
                if self.connected and self._last_id is None:  # start at the stream's end: older events are history
                    last = await self._reader.xrevrange(stream, count=1)
                    self._last_id = last[0][0] if last else "0-0"
            except self._errors as exc:
                self._mark_down(exc)
                continue
            if not self.connected or self._replicas <= 1:
                # Alone, the stream holds only our own events: no need to read them. The position is kept,
                # so when another replica shows up (next heartbeat) its first events are read too.
                await asyncio.sleep(self.heartbeat_s)
                continue
            try:
                got = await self._reader.xread({stream: self._last_id}, count=500, block=int(self.heartbeat_s * 1000))
            except self._errors as exc:
                self._mark_down(exc)
                continue
            for _name, entries in got or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    if fields.get(b"r") == me:
                        continue
                    for event in _events(fields.get(b"d")):
                        if event is None:
                            self.bad_events += 1
                            continue
                        try:
                            self._on_event(event)
                            self.applied_events += 1
                        except Exception:  # one bad event must not stop the replica from following the others
                            self.bad_events += 1
                            log.exception("could not apply a state event from another replica")

    def _mark_down(self, exc: BaseException) -> None:
        if self.connected or self._down_since is None:
            log.warning("state store %s unreachable (%s): serving from local state; %d session write(s) pending",
                        self.url, type(exc).__name__, len(self._writes))
            self._down_since = time.monotonic()
        self.connected = False

    def _mark_up(self) -> None:
        was_down = self._down_since is not None
        self.connected = True
        self._last_id = None  # a restarted Redis has a new stream
        if was_down:
            self.resyncs += 1
            log.warning("state store %s reachable again after %.1f s: resynchronising %d session record(s)",
                        self.url, time.monotonic() - self._down_since, len(self._writes))
            self._down_since = None
            self._on_resync()
        self._wake.set()


def _record(raw: bytes | None) -> SessionRecord | None:
    if not raw:
        return None
    try:
        data = orjson.loads(raw)
        rec = SessionRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS})
        if rec.resident_until is None:
            rec.resident_until = math.inf
        return rec
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        log.warning("ignoring an unreadable session record in the state store")
        return None


def _events(raw: bytes | None) -> list[Event | None]:
    """The events of one stream entry (a JSON array; None for each one that is unreadable)."""
    try:
        items = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return [None]
    if not isinstance(items, list):
        return [None]
    return [_event(item) for item in items[:10_000]]


def _event(d: Any) -> Event | None:
    try:
        if d["kind"] not in _EVENT_KINDS:
            return None
        at = d.get("at")
        return Event(d["kind"], d.get("worker"), float(d.get("value") or 0.0), math.inf if at is None else float(at),
                     str(d.get("session") or ""), bool(d.get("explicit")))
    except (TypeError, AttributeError, ValueError, KeyError):
        return None
