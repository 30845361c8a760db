"""Discrete-event simulator of a multi-round PD deployment, driving the same policy objects as the router.

Why: the planner must score allocations for exactly the routing policy that will run, so the simulator
calls a `PolicyRunner` through the four calls the live router makes (bind_session, route_prefill,
order_queue, on_metrics) and keeps the same `ClusterState` (queues, running task, windowed TTFT/ITL,
KV use, prefill-worker prefix caches) up to date from simulated events.

Model (service times all come from the cost model):
- Prefill workers run one prefill at a time, non-preemptively; before each dispatch the policy orders
  the queue. A remote prefill first reads the history the worker does not cache from the decode worker
  (t_kv d→p), computes the increment (t_pre), then pushes the increment back (t_kv p→d); the first token
  is out when the increment lands on the decode worker. The worker keeps an LRU prefix cache of the
  prompts it prefilled (bounded by its KV capacity).
- Decode workers batch continuously: a step of `b` running rounds reading `ctx` KV tokens takes
  t_dec(b, ctx). A local prefill waits for the current step, then runs before the next step (prefill is
  prioritised over decode, as in vLLM), pausing the whole batch.
- Each decode worker holds its sessions' KV between rounds (tool delays). A round reserves the KV it
  will need when it is sent; when memory runs out the least recently used idle session is evicted, and
  its next round re-prefills the whole context with l_hist = 0, as the real system must. A round that
  does not fit even after evicting every idle session waits for memory.
- TTFT of a round = first token − send time (initial and incremental prefills alike); ITL = its TPOT.
Everything is deterministic for a given workload and policy seed (heap ties break by insertion order).
"""

from __future__ import annotations

import heapq
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ampd_plugin import slo
from ampd_plugin.router_policy.registry import PolicyRunner, load_policy, policy_class
from ampd_plugin.router_policy.registry import policy_params as accepted_params
from ampd_plugin.costmodel import Layout
from ampd_plugin.router_policy.state import DECODE, PREFILL, ClusterState, PrefillTask, SessionInfo, WorkerState
from ampd_plugin.workload import Session

_POOL_RE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


@dataclass(frozen=True)
class Pool:
    """`count` replicas of one layout."""

    count: int
    layout: Layout = Layout()

    @property
    def gpus(self) -> int:
        return self.count * self.layout.devices

    def __str__(self) -> str:
        return f"{self.count}x{self.layout.tp}" + (f"x{self.layout.pp}pp" if self.layout.pp > 1 else "")


def parse_pool(text: str | int) -> Pool:
    """'N' or 'NxTP' (e.g. '2x4' = two replicas of TP 4); ValueError on anything else."""
    m = _POOL_RE.match(str(text))
    if not m:
        raise ValueError(f"bad pool {text!r}: expected N or NxTP, e.g. 2x4")
    count, tp = int(m.group(1)), int(m.group(2) or 1)
    if tp < 1:
        raise ValueError(f"bad pool {text!r}: TP degree must be >= 1")
    return Pool(count, Layout(tp=tp))


@dataclass(frozen=True)
class Deployment:
    """Prefill pool + decode pool. A co-located deployment has no prefill pool (count 0)."""

    prefill: Pool
    decode: Pool

    @classmethod
    def parse(cls, prefill: str | int, decode: str | int) -> "Deployment":
        return cls(parse_pool(prefill), parse_pool(decode))

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus

    def __str__(self) -> str:
        if self.prefill.count == 0:
            return f"D {self.decode} (co-located)"
        return f"P {self.prefill} + D {self.decode}"

    def to_dict(self) -> dict:
        return {
            "prefill": {"replicas": self.prefill.count, "tp": self.prefill.layout.tp, "pp": self.prefill.layout.pp},
            "decode": {"replicas": self.decode.count, "tp": self.decode.layout.tp, "pp": self.decode.layout.pp},
            "gpus": self.gpus,
        }


@dataclass
class SimResult:
    """What a run produced: one record per round, plus counters (events, evictions, ...)."""

    records: list[slo.RoundRecord]
    counters: dict[str, float]
    deployment: Deployment
    policy: str
    wall_s: float = 0.0

    @property
    def events(self) -> int:
        return int(self.counters["events"])

    def summary(self, ttft_slo: float, itl_slo: float) -> dict:
        """`slo.summarize` plus deployment, policy and counters (the `simulate --json` object)."""
        out = slo.summarize(self.records, ttft_slo, itl_slo)
        out.update(
            policy=self.policy,
            deployment=self.deployment.to_dict(),
            ttft_slo=ttft_slo,
            itl_slo=itl_slo,
            sessions=len({r.session_id for r in self.records}),
            evictions=int(self.counters["evictions"]),
            events=self.events,
            simulated_s=self.counters["simulated_s"],
            wall_s=self.wall_s,
        )
        return out


# -- simulation state --------------------------------------------------------------------------------


@dataclass
class _Round:
    sess: "_Sess"
    index: int
    sent: float
    l_hist: int
    l_incr: int
    n_out: int
    route: str = ""
    worker: str = ""
    kv_bytes: int = 0
    t_first: float = 0.0
    end_step: int = 0
    ctx0: int = 0


@dataclass
class _Sess:
    session: Session
    decode: "_Decode | None" = None
    context: int = 0  # tokens of the conversation so far (all earlier inputs and outputs)
    index: int = 0
    evicted: bool = False
    active: bool = False


@dataclass
class _Prefill:
    ws: WorkerState
    capacity: int
    busy: bool = False
    cache_used: int = 0


@dataclass
class _Decode:
    ws: WorkerState
    busy: bool = False
    step_no: int = 0
    ctx_sum: int = 0
    batch: list = field(default_factory=list)  # heap of (end_step, seq, _Round)
    joining: list = field(default_factory=list)
    last_step_end: float | None = None
    resident: dict = field(default_factory=dict)  # session id -> KV tokens held
    idle: OrderedDict = field(default_factory=OrderedDict)  # evictable sessions, LRU first
    mem_wait: list = field(default_factory=list)


class _Simulator:
    def __init__(self, deployment: Deployment, sessions: Sequence[Session], runner: PolicyRunner, cost_model: Any,
                 progress: Callable[[int, int], None] | None) -> None:
        self.cost = cost_model
        self.runner = runner
        self.progress = progress
        self.kv_bytes_per_token = int(cost_model.kv_bytes_per_token)
        self.cluster = ClusterState()
        self.prefill: dict[str, _Prefill] = {}
        self.decode: dict[str, _Decode] = {}
        window = runner.window_s
        for i in range(deployment.prefill.count):
            layout = deployment.prefill.layout
            capacity = cost_model.kv_capacity_tokens(layout)
            if capacity <= 0:
                raise ValueError(f"prefill layout TP{layout.tp} cannot hold the model weights; use a larger TP")
            ws = self.cluster.add_worker(WorkerState(f"p{i}", PREFILL, layout, window_s=window))
            ws.cached_prefix = OrderedDict()
            self.prefill[ws.worker_id] = _Prefill(ws, capacity)
        for i in range(deployment.decode.count):
            layout = deployment.decode.layout
            capacity = cost_model.kv_capacity_tokens(layout)
            if capacity <= 0:
                raise ValueError(f"decode layout TP{layout.tp} cannot hold the model weights; use a larger TP")
            ws = self.cluster.add_worker(WorkerState(f"d{i}", DECODE, layout, window_s=window,
                                                     kv_capacity_tokens=capacity))
            self.decode[ws.worker_id] = _Decode(ws)
        if not self.decode:
            raise ValueError("a deployment needs at least one decode worker")
        self.sessions = list(sessions)
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.records: list[slo.RoundRecord] = []
        self.done_sessions = 0
        self.counters = dict(events=0, evictions=0, reprefill_tokens=0, memory_waits=0, local=0, remote=0)
        self._t_pre = cost_model.t_pre
        self._t_dec = cost_model.t_dec
        self._t_kv = cost_model.t_kv

    # -- event loop ----------------------------------------------------------------------------
    def at(self, t: float, fn: Callable, arg: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def run(self) -> None:
        for s in self.sessions:
            if s.rounds:
                self.at(s.arrival_s, self.arrive, _Sess(s))
        heap = self.heap
        events = 0
        while heap:
            t, _, fn, arg = heapq.heappop(heap)
            self.now = t
            self.cluster.now = t
            fn(arg)
            events += 1
        self.counters["events"] = events
        self.counters["simulated_s"] = self.now

    # -- sessions and rounds -------------------------------------------------------------------
    def arrive(self, st: _Sess) -> None:
        s = st.session
        info = SessionInfo(s.session_id, first_prompt_tokens=s.rounds[0].input_tokens,
                           expected_rounds=float(len(s.rounds)))
        worker_id = self.runner.bind_session(info, self.cluster)
        st.decode = self.decode[worker_id]
        self.send_round(st)

    def send_round(self, st: _Sess) -> None:
        """The client sends round `st.index`: reserve KV on the decode worker, route, enqueue."""
        d = st.decode
        rnd = st.session.rounds[st.index]
        sid = st.session.session_id
        need = st.context + rnd.input_tokens + rnd.output_tokens
        if need > d.ws.kv_capacity_tokens:
            self.abort(st, f"context of {need} tokens exceeds the decode worker's KV capacity "
                           f"({d.ws.kv_capacity_tokens})")
            return
        st.active = True
        if not self.reserve(d, st):
            self.counters["memory_waits"] += 1
            d.mem_wait.append((st, self.now))
            return
        self.start_round(st, self.now)

    def reserve(self, d: _Decode, st: _Sess) -> bool:
        """Make room for the round's KV; if it cannot fit, the session gives up its own history too
        (so waiting sessions never hold memory another waiting session needs)."""
        sid = st.session.session_id
        rnd = st.session.rounds[st.index]
        need = st.context + rnd.input_tokens + rnd.output_tokens
        d.idle.pop(sid, None)  # never evict the session we are making room for
        if self.make_room(d, need - d.resident.get(sid, 0)):
            return True
        if sid in d.resident:
            d.ws.kv_used_tokens -= d.resident.pop(sid)
            st.evicted = True
            self.counters["evictions"] += 1
            return self.make_room(d, need)
        return False

    def start_round(self, st: _Sess, sent: float) -> None:
        d = st.decode
        sid = st.session.session_id
        rnd = st.session.rounds[st.index]
        need = st.context + rnd.input_tokens + rnd.output_tokens
        d.ws.kv_used_tokens += need - d.resident.get(sid, 0)
        d.resident[sid] = need
        if st.evicted:  # the history is gone: prefill the whole context again
            l_hist, l_incr = 0, st.context + rnd.input_tokens
            self.counters["reprefill_tokens"] += st.context
            st.evicted = False
        else:
            l_hist, l_incr = st.context, rnd.input_tokens
        r = _Round(st, st.index, sent, l_hist, l_incr, rnd.output_tokens)
        task = PrefillTask(sid, st.index, l_hist, l_incr, sent, decode_worker=d.ws.worker_id)
        task.sim_round = r  # the simulator's own handle; policies never look at it
        route = self.runner.route_prefill(task, self.cluster)
        r.route, r.worker = route.kind, route.worker
        self.counters[route.kind] += 1
        if route.kind == "remote":
            p = self.prefill[route.worker]
            p.ws.queue.append(task)
            if not p.busy:
                self.dispatch_prefill(p)
        else:
            d.ws.queue.append(task)
            if not d.busy:
                self.kick(d)

    def make_room(self, d: _Decode, extra: int) -> bool:
        """Evict idle sessions (LRU first) until `extra` tokens fit; False if they cannot."""
        ws = d.ws
        while ws.kv_used_tokens + extra > ws.kv_capacity_tokens:
            if not d.idle:
                return False
            victim_id, victim = d.idle.popitem(last=False)
            ws.kv_used_tokens -= d.resident.pop(victim_id)
            victim.evicted = True
            self.counters["evictions"] += 1
        return True

    def retry_memory(self, d: _Decode) -> None:
        while d.mem_wait:
            st, sent = d.mem_wait[0]
            if not self.reserve(d, st):
                return
            d.mem_wait.pop(0)
            self.start_round(st, sent)

    def finish_round(self, r: _Round, t_last: float) -> None:
        st = r.sess
        ttft = r.t_first - r.sent
        self.records.append(slo.RoundRecord(
            session_id=st.session.session_id, round_index=r.index, ttft=ttft,
            itl=slo.tpot(r.t_first, t_last, r.n_out), input_tokens=r.l_incr, output_tokens=r.n_out,
            route=r.route, worker=r.worker, kv_bytes=r.kv_bytes, start=r.sent))
        self.runner.on_metrics(st.decode.ws.worker_id, "output_tokens", r.n_out, t_last)
        rnd = st.session.rounds[st.index]
        st.context += rnd.input_tokens + rnd.output_tokens
        st.active = False
        st.index += 1
        d = st.decode
        sid = st.session.session_id
        if st.index < len(st.session.rounds):
            if sid in d.resident:
                d.idle[sid] = st  # evictable while the tool runs
            self.at(t_last + rnd.tool_delay_s, self.send_round, st)
        else:
            d.ws.kv_used_tokens -= d.resident.pop(sid, 0)
            self.cluster.unbind_session(sid)
            self.session_done()
        if d.mem_wait:
            self.retry_memory(d)

    def abort(self, st: _Sess, reason: str) -> None:
        """Record every remaining round of the session as failed (never silently drop a session)."""
        sid = st.session.session_id
        for k in range(st.index, len(st.session.rounds)):
            rnd = st.session.rounds[k]
            self.records.append(slo.RoundRecord(session_id=sid, round_index=k, ttft=0.0, itl=None,
                                                input_tokens=rnd.input_tokens, output_tokens=rnd.output_tokens,
                                                start=self.now, error=reason))
        d = st.decode
        d.idle.pop(sid, None)
        d.ws.kv_used_tokens -= d.resident.pop(sid, 0)
        self.cluster.unbind_session(sid)
        self.session_done()
        if d.mem_wait:
            self.retry_memory(d)

    def session_done(self) -> None:
        self.done_sessions += 1
        if self.progress is not None and self.done_sessions % 256 == 0:
            self.progress(self.done_sessions, len(self.sessions))

    # -- prefill workers -----------------------------------------------------------------------
    def dispatch_prefill(self, p: _Prefill) -> None:
        ws = p.ws
        if not ws.queue:
            return
        self.runner.order_queue(ws, self.now)
        task = ws.queue.pop(0)
        r: _Round = task.sim_round
        sid = task.session_id
        d = r.sess.decode
        cached = ws.cached_prefix.get(sid, 0)
        total = task.l_hist + task.l_incr
        hist = max(task.l_hist, min(cached, total))  # what the computation can attend to without computing
        read = max(0, task.l_hist - cached)  # history this worker lacks, read from the decode worker
        t_in = self._t_kv(read, d.ws.layout, ws.layout) if read else 0.0
        compute = self._t_pre(hist, total - hist, ws.layout)
        r.kv_bytes = (read + task.l_incr) * self.kv_bytes_per_token
        ws.running = task
        task.started_at = self.now
        p.busy = True
        self.at(self.now + t_in + compute, self.prefill_done, (p, task))

    def prefill_done(self, arg: tuple[_Prefill, PrefillTask]) -> None:
        p, task = arg
        ws = p.ws
        r: _Round = task.sim_round
        d = r.sess.decode
        ws.running = None
        p.busy = False
        self.cache_prefix(p, task.session_id, task.l_hist + task.l_incr)
        t_out = self._t_kv(task.l_incr, ws.layout, d.ws.layout) if task.l_incr else 0.0
        first = self.now + t_out
        self.cluster.record_ttft(ws.worker_id, self.now, first - r.sent)
        self.runner.on_metrics(ws.worker_id, "ttft", first - r.sent, self.now)
        self.at(first, self.first_token, r)
        self.dispatch_prefill(p)

    def cache_prefix(self, p: _Prefill, sid: str, tokens: int) -> None:
        cache = p.ws.cached_prefix
        p.cache_used += tokens - cache.pop(sid, 0)
        cache[sid] = tokens
        while p.cache_used > p.capacity and cache:
            _, dropped = cache.popitem(last=False)
            p.cache_used -= dropped

    # -- decode workers ------------------------------------------------------------------------
    def first_token(self, r: _Round) -> None:
        """The round's first token is out (its KV is on the decode worker): join the batch."""
        r.t_first = self.now
        if r.n_out <= 1:
            self.finish_round(r, self.now)
            return
        d = r.sess.decode
        d.joining.append(r)
        d.ws.decoding += 1
        if not d.busy:
            self.kick(d)

    def kick(self, d: _Decode) -> None:
        """The decode worker is free: run a waiting local prefill first, else one decode step."""
        ws = d.ws
        if ws.queue:
            self.runner.order_queue(ws, self.now)
            task = ws.queue.pop(0)
            ws.running = task
            task.started_at = self.now
            d.busy = True
            self.at(self.now + self._t_pre(task.l_hist, task.l_incr, ws.layout), self.local_done, (d, task))
            return
        if d.joining:
            for r in d.joining:
                r.end_step = d.step_no + r.n_out - 1
                r.ctx0 = r.l_hist + r.l_incr
                d.ctx_sum += r.ctx0
                self.seq += 1
                heapq.heappush(d.batch, (r.end_step, self.seq, r))
            d.joining.clear()
        if d.batch:
            d.busy = True
            self.at(self.now + self._t_dec(len(d.batch), d.ctx_sum, ws.layout), self.step_done, d)
        else:
            d.last_step_end = None

    def local_done(self, arg: tuple[_Decode, PrefillTask]) -> None:
        d, task = arg
        d.ws.running = None
        d.busy = False
        r: _Round = task.sim_round
        self.cluster.record_ttft(d.ws.worker_id, self.now, self.now - r.sent)
        self.runner.on_metrics(d.ws.worker_id, "ttft", self.now - r.sent, self.now)
        self.first_token(r)
        if not d.busy:
            self.kick(d)

    def step_done(self, d: _Decode) -> None:
        now = self.now
        d.busy = False
        d.step_no += 1
        d.ctx_sum += len(d.batch)
        if d.last_step_end is not None:
            self.cluster.record_itl(d.ws.worker_id, now, now - d.last_step_end)
        d.last_step_end = now
        batch = d.batch
        while batch and batch[0][0] <= d.step_no:
            _, _, r = heapq.heappop(batch)
            d.ctx_sum -= r.ctx0 + r.n_out - 1
            d.ws.decoding -= 1
            self.finish_round(r, now)
        if not d.busy:
            self.kick(d)


def simulate(
    deployment: Deployment,
    workload: Iterable[Session],
    policy: str | PolicyRunner,
    cost_model: Any,
    *,
    ttft_slo: float,
    itl_slo: float,
    seed: int = 0,
    policy_params: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run `workload` on `deployment` under `policy` (a registered name or a ready PolicyRunner).

    A policy given by name is built with `ttft_slo`, `itl_slo` and `seed` (when it accepts them) plus
    `policy_params`. `progress(done_sessions, total)` is called every 256 finished sessions.
    """
    if ttft_slo <= 0 or itl_slo <= 0:
        raise ValueError(f"SLOs must be positive, got ttft_slo={ttft_slo}, itl_slo={itl_slo}")
    if isinstance(policy, PolicyRunner):
        runner = policy
    else:
        accepted = accepted_params(policy_class(policy))
        base = {k: v for k, v in dict(ttft_slo=ttft_slo, itl_slo=itl_slo, seed=seed).items() if k in accepted}
        runner = load_policy(policy, cost_model, **{**base, **(policy_params or {})})
    started = time.perf_counter()
    sim = _Simulator(deployment, list(workload), runner, cost_model, progress)
    sim.run()
    if progress is not None:
        progress(sim.done_sessions, len(sim.sessions))
    return SimResult(sim.records, sim.counters, deployment, runner.name, time.perf_counter() - started)
