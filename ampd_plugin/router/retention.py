"""Releasing a migrated session's retention pin on the decode worker it left.

The `ampd` connector pins a session's blocks on its decode worker after every round (`retention_ttl_s`),
and releases them when the next round of that session reaches the same worker, on `retain=False`, at
the TTL or under memory pressure (connector/params.py, connector/vllm/holds.py). After a migration the
next round goes to the *new* worker, so nothing would release the old pin before its TTL — on the very
worker that was short of KV memory. Once the migrated round has ended (the new worker has read the
history), the router therefore sends the old worker a one-token request naming the session with
`retain=False`: the connector drops the session's pin and keeps nothing for that request.

Releases are fire-and-forget but owned: at most `max_pending` run at once (beyond that the pin is left
to lapse at its TTL, and counted), each is bounded by the upstream timeouts, and every outcome is counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import orjson

from ampd_plugin.connector import params as wire
from ampd_plugin.router.metrics import RouterMetrics
from ampd_plugin.router.upstream import Upstreams

log = logging.getLogger("ampd.router")

_RELEASE_PROMPT = [0]  # one token id every vocabulary has; the request's only effect is the release


class RetentionReleaser:
    def __init__(self, upstreams: Upstreams, metrics: RouterMetrics, model: Callable[[], str | None],
                 max_pending: int = 64) -> None:
        self.upstreams, self.metrics, self.model = upstreams, metrics, model
        self.max_pending = max_pending
        self._pending: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def release(self, worker_id: str, session: str) -> None:
        """Drop `session`'s retention pin on `worker_id` (in the background; call from the event loop)."""
        if len(self._pending) >= self.max_pending:
            self.metrics.retention_releases.labels("lapsed").inc()
            log.info("not releasing %s on %s now (%d releases pending); its pin lapses at the connector's TTL",
                     session, worker_id, len(self._pending))
            return
        task = asyncio.ensure_future(self._send(worker_id, session))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, worker_id: str, session: str) -> None:
        body = {"model": self.model(), "prompt": _RELEASE_PROMPT, "max_tokens": 1, "temperature": 0, "stream": False,
                "kv_transfer_params": wire.local_params(session=session, retain=False)}
        try:
            status, _ = await self.upstreams.exchange(worker_id, "/v1/completions", orjson.dumps(body),
                                                      {"Content-Type": "application/json"}, "release response")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed release leaves the pin to its TTL
            self.metrics.retention_releases.labels("failed").inc()
            log.warning("releasing %s on %s failed (%s); its pin lapses at the connector's TTL", session, worker_id, exc)
            return
        self.metrics.retention_releases.labels("sent" if status == 200 else "failed").inc()
        if status != 200:
            log.warning("releasing %s on %s: HTTP %s; its pin lapses at the connector's TTL", session, worker_id, status)

    async def close(self) -> None:
        for t in list(self._pending):
            t.cancel()
        for t in list(self._pending):
            try:
                await t
            except BaseException:  # noqa: BLE001 - cancelled on shutdown
                pass
