"""Router-held prefill queues: the policy's order is the order that runs; capacity, cancellation, failure."""

import asyncio

import pytest

from ampd_plugin.router.queues import PrefillQueues
from ampd_plugin.router_policy.state import ClusterState, PrefillTask, WorkerState
from ampd_plugin.router.upstream import WorkerDown


def make(order=None, slots=1):
    cluster = ClusterState()
    cluster.add_worker(WorkerState("prefill-0", "prefill"))
    changes = []
    q = PrefillQueues(cluster, order or (lambda w, now: None), lambda wid: slots,
                      lambda wid, n, reordered: changes.append((n, reordered)))
    return cluster, q, changes


def task(n, t):
    return PrefillTask("s", 0, 0, n, enqueue_time=t)


def shortest_first(worker, now):
    return sorted(worker.queue, key=lambda t: t.l_incr)


def test_policy_order_is_execution_order():
    async def main():
        cluster, q, changes = make(shortest_first)
        ran = []
        tasks = [task(n, i) for i, n in enumerate([100, 300, 50, 200])]

        async def one(t):
            await q.acquire("prefill-0", t)
            ran.append(t.l_incr)
            await asyncio.sleep(0.01)
            q.release("prefill-0", t)

        await asyncio.gather(*(one(t) for t in tasks))
        return ran, changes

    ran, changes = asyncio.run(main())
    assert ran == [100, 50, 200, 300]  # the first arrival runs at once; the rest shortest-first
    assert any(reordered for _, reordered in changes)


def test_capacity_bounds_inflight():
    async def main():
        cluster, q, _ = make(slots=2)
        ts = [task(10, i) for i in range(3)]
        waits = [asyncio.create_task(q.acquire("prefill-0", t)) for t in ts]
        await asyncio.sleep(0.01)
        started = [w.done() for w in waits]
        q.release("prefill-0", ts[0])
        await asyncio.sleep(0.01)
        return started, waits[2].done(), q.inflight("prefill-0")

    started, third_after, inflight = asyncio.run(main())
    assert started == [True, True, False] and third_after and inflight == 2


def test_cancelled_wait_leaves_the_queue():
    async def main():
        cluster, q, _ = make()
        a, b, c = task(1, 0), task(2, 1), task(3, 2)
        await q.acquire("prefill-0", a)
        wb = asyncio.create_task(q.acquire("prefill-0", b))
        wc = asyncio.create_task(q.acquire("prefill-0", c))
        await asyncio.sleep(0.01)
        wb.cancel()
        await asyncio.sleep(0.01)
        q.release("prefill-0", a)
        await asyncio.wait_for(wc, 1)
        return cluster.prefill["prefill-0"].queue, cluster.prefill["prefill-0"].running

    queue, running = asyncio.run(main())
    assert queue == [] and running.l_incr == 3


def test_dead_worker_fails_waiters():
    async def main():
        cluster, q, _ = make()
        a, b = task(1, 0), task(2, 1)
        await q.acquire("prefill-0", a)
        wb = asyncio.create_task(q.acquire("prefill-0", b))
        await asyncio.sleep(0.01)
        q.fail_all("prefill-0", WorkerDown("prefill-0", "gone"))
        with pytest.raises(WorkerDown):
            await wb

    asyncio.run(main())
