"""The router's per-worker prefill queues: the policy orders them, the router releases work by capacity.

Engines run what they receive in their own order, so a reordering policy (AMPD Algorithm 2) only has an
effect if the router keeps the backlog itself: each worker gets at most `slots` prefills in flight, the
rest wait here in `WorkerState.queue`, and whenever a slot frees the policy's `order_queue` picks the next.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from ampd_plugin.router_policy.state import ClusterState, PrefillTask


class PrefillQueues:
    def __init__(
        self,
        cluster: ClusterState,
        order: Callable[[object, float], list[PrefillTask] | None],
        slots: Callable[[str], int],
        on_change: Callable[[str, int, bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self._order = order
        self._slots = slots
        self._on_change = on_change or (lambda worker, qlen, reordered: None)
        self._clock = clock
        self._inflight: dict[str, list[PrefillTask]] = {}
        self._waiters: dict[str, asyncio.Future] = {}

    def inflight(self, worker_id: str) -> int:
        return len(self._inflight.get(worker_id, ()))

    async def acquire(self, worker_id: str, task: PrefillTask) -> None:
        """Wait until `task` may run on `worker_id`. Cancelled waits leave the queue cleanly."""
        worker = self.cluster.worker(worker_id)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[task.task_id] = fut
        worker.queue.append(task)
        self._dispatch(worker_id)
        try:
            await fut
        except BaseException:
            self._waiters.pop(task.task_id, None)
            if task in worker.queue:
                worker.queue.remove(task)
                self._on_change(worker_id, len(worker.queue), False)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(worker_id, task)  # granted and cancelled in the same instant
            raise

    def release(self, worker_id: str, task: PrefillTask) -> None:
        """The task's prefill finished (or failed): free its slot and start the next one."""
        running = self._inflight.get(worker_id)
        if running and task in running:
            running.remove(task)
            worker = self.cluster.worker(worker_id)
            worker.running = running[0] if running else None
            self._dispatch(worker_id)

    def fail_all(self, worker_id: str, exc: Exception) -> None:
        """The worker died: every task waiting for it fails with `exc` (its round re-routes)."""
        worker = self.cluster.worker(worker_id)
        for task in list(worker.queue):
            fut = self._waiters.pop(task.task_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        worker.queue.clear()
        self._on_change(worker_id, 0, False)

    def _dispatch(self, worker_id: str) -> None:
        worker = self.cluster.worker(worker_id)
        running = self._inflight.setdefault(worker_id, [])
        while worker.queue and len(running) < self._slots(worker_id):
            now = self._clock()
            oldest = min(worker.queue, key=lambda t: t.enqueue_time)
            if len(worker.queue) > 1:
                ordered = self._order(worker, now)
                if ordered and len(ordered) == len(worker.queue):
                    worker.queue[:] = ordered
            task = worker.queue.pop(0)
            fut = self._waiters.pop(task.task_id, None)
            if fut is None or fut.done():
                continue  # its waiter went away
            running.append(task)
            worker.running = running[0]
            self._on_change(worker_id, len(worker.queue), task is not oldest)
            fut.set_result(None)
        if not worker.queue:
            self._on_change(worker_id, 0, False)
