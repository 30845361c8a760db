"""The engines behind the router: one pooled aiohttp client, health checks, model discovery.

Every request to an engine goes through `Upstreams.post` and `read_body`, the one place where connection
failures become `WorkerDown`, timeouts `UpstreamTimeout`, and an engine's refusal a `RouterError`
(`upstream_error`).

aiohttp, not httpx, on the relay path: measured on these machines, an httpx-based proxy adds ~1.5 ms and
collapses under concurrency in its connection pool; aiohttp adds ~0.5 ms (router_anchor.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
import orjson

from ampd_plugin.router.errors import RouterError

log = logging.getLogger("ampd.router")

# vLLM and SGLang serve through uvicorn, which closes a keep-alive connection idle for 5 s
# (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, uvicorn's timeout_keep_alive). aiohttp keeps idle connections 15 s by
# default, so a request sent on a connection the engine had just closed failed ("Can not write request
# body", "Server disconnected") and a healthy engine was taken for dead. Idle connections are dropped sooner.
_KEEPALIVE_S = 4.0


class UpstreamTimeout(Exception):
    """An engine accepted the connection but did not answer in time (slow, not necessarily dead)."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"{worker_id} timed out")
        self.worker_id = worker_id


class WorkerFailed(Exception):
    """An engine answered 5xx before any byte reached the client: the round may run elsewhere."""

    def __init__(self, worker_id: str, status: int, data: bytes) -> None:
        super().__init__(f"{worker_id} answered {status}")
        self.worker_id, self.status, self.data = worker_id, status, data


class WorkerDown(Exception):
    """An engine could not be reached (refused, reset, timed out before answering)."""

    def __init__(self, worker_id: str, detail: str) -> None:
        super().__init__(f"{worker_id}: {detail}")
        self.worker_id = worker_id
        self.detail = detail


@dataclass(frozen=True)
class Endpoint:
    worker_id: str
    kind: str  # "prefill" | "decode"
    url: str  # base URL, no trailing slash

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[-1].split("/", 1)[0]


def endpoints(prefill: list[str], decode: list[str]) -> dict[str, Endpoint]:
    """Stable short ids (prefill-0, decode-0, ...) used in state, metrics and logs."""
    out: dict[str, Endpoint] = {}
    for kind, urls in (("prefill", prefill), ("decode", decode)):
        for i, url in enumerate(urls):
            wid = f"{kind}-{i}"
            out[wid] = Endpoint(wid, kind, url.rstrip("/"))
    return out


class Upstreams:
    """Pooled HTTP client to every engine plus a background health loop."""

    def __init__(
        self,
        eps: dict[str, Endpoint],
        *,
        connect_timeout_s: float,
        total_timeout_s: float,
        read_timeout_s: float,
        health_timeout_s: float,
    ) -> None:
        self.eps = eps
        self._timeout = aiohttp.ClientTimeout(total=total_timeout_s, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # limit=0: no pool cap (the router's own queues bound the work); keep-alive connections are reused.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True,
                                         keepalive_timeout=_KEEPALIVE_S)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def with_read_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        """The request timeout with a shorter allowed silence (streams and prefills: a stall fails fast)."""
        t = self._timeout
        return aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=min(seconds, t.sock_read or seconds))

    async def post(self, worker_id: str, path: str, data: bytes, headers: dict[str, str],
                   timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        """Send a request and return once the response headers arrived; connection failures → WorkerDown."""
        assert self.session is not None, "Upstreams.start() first"
        url = self.eps[worker_id].url + path
        try:
            try:
                return await self.session.post(url, data=data, headers=headers, timeout=timeout or self._timeout)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # refused or unreachable: a new connection would fail the same way
                # A pooled connection the engine closed as we reused it (the keep-alive race): the engine
                # answered nothing, so the request goes once more on a fresh connection.
                log.debug("%s: retrying on a new connection after %s", worker_id, exc)
                return await self.session.post(url, data=data, headers=headers, timeout=timeout or self._timeout)
        except aiohttp.ConnectionTimeoutError as exc:
            raise WorkerDown(worker_id, f"connect timeout: {exc}") from exc
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(worker_id) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise WorkerDown(worker_id, f"{type(exc).__name__}: {exc}") from exc

    async def read_body(self, worker_id: str, resp: aiohttp.ClientResponse, what: str = "response") -> bytes:
        """The whole body of `resp`; a timeout → UpstreamTimeout, a broken body → WorkerDown (`resp` closed)."""
        try:
            return await resp.read()
        except asyncio.TimeoutError as exc:
            resp.close()
            raise UpstreamTimeout(worker_id) from exc
        except aiohttp.ClientError as exc:
            resp.close()
            raise WorkerDown(worker_id, f"{what} broken: {exc}") from exc

    async def exchange(self, worker_id: str, path: str, data: bytes, headers: dict[str, str],
                       what: str = "response", timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, bytes]:
        """POST and read the whole answer: (status, body), failures mapped as by `post` and `read_body`."""
        resp = await self.post(worker_id, path, data, headers, timeout)
        return resp.status, await self.read_body(worker_id, resp, what)

    async def get(self, worker_id: str, path: str) -> tuple[int, bytes] | None:
        """A short GET with the health timeout: (status, body), or None when the engine cannot be reached."""
        assert self.session is not None, "Upstreams.start() first"
        try:
            async with self.session.get(self.eps[worker_id].url + path, timeout=self._health_timeout) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def get_json(self, worker_id: str, path: str) -> dict | None:
        got = await self.get(worker_id, path)
        if got is None or got[0] != 200:
            return None
        try:
            return json.loads(got[1])
        except ValueError:
            return None

    async def healthy(self, worker_id: str) -> bool | None:
        """True: answered 200. False: refused, reset or answered an error. None: no answer in time (slow)."""
        assert self.session is not None, "Upstreams.start() first"
        try:
            async with self.session.get(self.eps[worker_id].url + "/health", timeout=self._health_timeout) as r:
                await r.read()
                return r.status == 200
        except asyncio.TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
            return None
        except (aiohttp.ClientError, OSError):
            return False

    async def check_all(self) -> dict[str, bool | None]:
        ids = list(self.eps)
        results = await asyncio.gather(*(self.healthy(w) for w in ids))
        return dict(zip(ids, results))

    async def health_loop(self, interval_s: float, on_result: Callable[[dict[str, bool | None]], Awaitable[None] | None]) -> None:
        """Poll /health of every worker forever; `on_result` applies the changes."""
        while True:
            try:
                result = on_result(await self.check_all())
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a callback must not stop health checking
                log.exception("health check round failed")
            await asyncio.sleep(interval_s)

    async def discover_model(self) -> dict | None:
        """The first model card any worker serves: {'id', 'root', 'max_model_len', ...}."""
        for wid in self.eps:
            data = await self.get_json(wid, "/v1/models")
            if data and data.get("data"):
                return data["data"][0]
        return None


def upstream_error(status: int, data: bytes) -> RouterError:
    """An engine's refusal (its OpenAI error body) as the router's error: 4xx stays the client's, else 502."""
    message = "upstream refused the request"
    with contextlib.suppress(Exception):
        err = orjson.loads(data).get("error")
        message = err.get("message", message) if isinstance(err, dict) else str(err or message)
    return RouterError(status if 400 <= status < 500 else 502, message, f"upstream_{status}")
