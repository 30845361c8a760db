"""Discrete-event simulator of a multi-round PD deployment, driving the same policy objects as the router.

Why: the planner must score allocations for exactly the routing policy that will run, so the simulator
calls a `PolicyRunner` through the four calls the live router makes (bind_session, route_prefill,
order_queue, on_metrics) and keeps the same `ClusterState` (queues, running task, windowed TTFT/ITL,
KV use, prefill-worker prefix caches) up to date from simulated events.

What it mirrors of the router (`router_policy/server.py`, `queues.py`):
- a round reaches the router after its hop (`ServingTerms.router_s`); the router's view of the history is
  what it accounted at the end of the session's last round (prompt + output on the bound worker); with no
  KV connector every prefill is local; otherwise context migration under KV pressure (`maybe_migrate`,
  the router's `_maybe_migrate` rule on its own accounting, which keeps a finished session counted for the
  session TTL) comes before the policy's route;
- per-worker prefill queues ordered by the policy, `prefill_slots`/`local_prefill_slots` in flight; a prefill
  worker's slot is freed when its answer reaches the router, a local one at the first token;
- remote round (`costmodel.kv_pricing.remote_round`, by the prefill layout's backend): P's front end, on vLLM
  the history P lacks read from D (after D *exports* it: a request through D's front end and one D step,
  plus `export_s`) — on SGLang nothing is read and P recomputes what its prefix cache lacks —, P's prefill, then `remote_s` (P's answer, the router's call to
  D), D's front end, D reads the KV of the prompt past what it holds (the increment) and computes the last position; local round: D's front end
  (a migrated round first reads the history from the old worker), then D's engine.
What it models of the engines (`engine_sim.Engine`): vLLM V1 steps under a token budget — decode tokens plus
prefill chunks per step, so a local prefill slows the batch's steps instead of pausing it, and a prefill
worker batches prefills; one FIFO API front end per worker (`frontend_s` per request); KV memory of running
rounds and cached histories, idle histories evicted LRU under pressure (the next round recomputes them,
as vLLM's prefix cache does), a round that cannot fit waits for memory.
TTFT of a round = its first token − the client's send time; the policy gets the sample at that moment,
for the worker that prefilled; ITL = the round's TPOT (`slo.tpot`), one sample per round, as the router
records it. Everything is deterministic for a given workload and policy seed (heap ties break by insertion
order).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ampd_plugin import slo
from ampd_plugin.costmodel.kv_pricing import remote_round
from ampd_plugin.costmodel.layout import pair_refusal
from ampd_plugin.planner.deployment import Deployment, Pool, SimResult, parse_pool  # noqa: F401 (re-exported)
from ampd_plugin.planner.engine_sim import Engine, Job
from ampd_plugin.planner.serving import ServingTerms
from ampd_plugin.router_policy.registry import PolicyRunner, load_policy, policy_class
from ampd_plugin.router_policy.registry import policy_params as accepted_params
from ampd_plugin.router_policy.state import (DECODE, PREFILL, ClusterState, PrefillTask, Route, SessionInfo,
                                             WorkerState)
from ampd_plugin.workload import Session

# -- simulation state --------------------------------------------------------------------------------


@dataclass
class _Round:
    sess: "_Sess"
    index: int
    sent: float
    l_hist: int  # the router's view (what the policy is told)
    l_incr: int
    n_out: int
    task: PrefillTask | None = None
    ship: int | None = None  # remote round: prompt tokens whose KV P sends to D (None: what P computed)
    route: str = ""
    worker: str = ""
    migrate_from: "_Decode | None" = None
    kv_bytes: int = 0
    t_first: float = 0.0
    computed: int = 0  # prompt tokens the prefilling engine really computed


@dataclass
class _Sess:
    session: Session
    decode: "_Decode | None" = None
    context: int = 0  # tokens of the conversation so far (all earlier inputs and outputs)
    index: int = 0
    evicted: bool = False  # the engine dropped its cached history (engine truth; the router does not know)
    active: bool = False
    router_tokens: int = 0  # what the router believes the bound decode worker holds for it
    router_worker: "_Decode | None" = None
    migrating: bool = False  # its history is being read from the previous decode worker


@dataclass
class _Worker:
    """A worker as the router sees it (queue, slots) plus its simulated engine."""

    ws: WorkerState
    engine: Engine
    slots: int
    inflight: list = field(default_factory=list)


@dataclass
class _Prefill(_Worker):
    capacity: int = 0
    cache_used: int = 0


@dataclass
class _Decode(_Worker):
    kv_used: int = 0  # engine memory: running rounds + cached histories
    resident: dict = field(default_factory=dict)  # session id -> KV tokens the engine holds
    idle: OrderedDict = field(default_factory=OrderedDict)  # evictable sessions, LRU first
    mem_wait: list = field(default_factory=list)


class _Simulator:
    def __init__(self, deployment: Deployment, sessions: Sequence[Session], runner: PolicyRunner, cost_model: Any,
                 progress: Callable[[int, int], None] | None, terms: ServingTerms, kv_connector: str,
                 session_ttl_s: float, count_inflight: bool) -> None:
        self.cost = cost_model
        self.count_inflight = count_inflight
        self.runner = runner
        self.progress = progress
        self.terms = terms
        self.kv_connector = kv_connector
        self.session_ttl_s = session_ttl_s
        self.kv_bytes_per_token = int(cost_model.kv_bytes_per_token)
        self.cluster = ClusterState()
        self.prefill: dict[str, _Prefill] = {}
        self.decode: dict[str, _Decode] = {}
        self.workers: dict[str, _Worker] = {}
        heads = getattr(cost_model, "num_key_value_heads", None)
        if deployment.prefill.count and heads:  # the connector moves KV only between layouts it can map
            why = pair_refusal(heads, deployment.prefill.layout, deployment.decode.layout,
                               deployment.prefill.layout.backend)
            if why:
                raise ValueError(f"{deployment}: {why}")
        window = runner.window_s
        for kind, pool, prefix in ((PREFILL, deployment.prefill, "p"), (DECODE, deployment.decode, "d")):
            layout = pool.layout
            capacity = cost_model.kv_capacity_tokens(layout) if pool.count else 0
            if pool.count and capacity <= 0:
                raise ValueError(f"{kind} layout TP{layout.tp} cannot hold the model weights; use a larger TP")
            for i in range(pool.count):
                engine = Engine(layout, cost_model, terms, self.at, self.clock)
                if kind == PREFILL:
                    ws = self.cluster.add_worker(WorkerState(f"{prefix}{i}", PREFILL, layout, window_s=window))
                    ws.cached_prefix = OrderedDict()
                    w = self.prefill[ws.worker_id] = _Prefill(ws, engine, terms.prefill_slots, capacity=capacity)
                else:
                    ws = self.cluster.add_worker(WorkerState(f"{prefix}{i}", DECODE, layout, window_s=window,
                                                             kv_capacity_tokens=capacity))
                    w = self.decode[ws.worker_id] = _Decode(ws, engine, terms.local_prefill_slots)
                self.workers[ws.worker_id] = w
        if not self.decode:
            raise ValueError("a deployment needs at least one decode worker")
        self.sessions = list(sessions)
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.last_round_end = 0.0
        self.router_free_at = 0.0
        self.records: list[slo.RoundRecord] = []
        self.done_sessions = 0
        self.counters = dict(events=0, evictions=0, reprefill_tokens=0, memory_waits=0, local=0, remote=0,
                             migrations=0, migrated_tokens=0)
        self._t_kv = cost_model.t_kv

    # -- event loop ----------------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

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
        self.counters["simulated_s"] = self.last_round_end
        for d in self.decode.values():
            self.counters["mixed_steps"] = self.counters.get("mixed_steps", 0) + d.engine.mixed_steps

    # -- sessions and rounds -------------------------------------------------------------------
    def arrive(self, st: _Sess) -> None:
        s = st.session
        info = SessionInfo(s.session_id, first_prompt_tokens=s.rounds[0].input_tokens,
                           expected_rounds=float(len(s.rounds)))
        worker_id = self.runner.bind_session(info, self.cluster)
        st.decode = self.decode[worker_id]
        self.send_round(st)

    def send_round(self, st: _Sess) -> None:
        """The client sends round `st.index`; the router (one process, first come first served) handles it
        after its hop."""
        self.router_free_at = max(self.now, self.router_free_at) + self.terms.router_s
        self.at(self.router_free_at, self.route_round, (st, self.now))

    def route_round(self, arg: tuple[_Sess, float]) -> None:
        """The router's `_attempt`: its view of the history, migration under KV pressure, the policy's route."""
        st, sent = arg
        d = st.decode
        rnd = st.session.rounds[st.index]
        sid = st.session.session_id
        prompt = st.context + rnd.input_tokens
        need = prompt + rnd.output_tokens
        if need > d.ws.kv_capacity_tokens:
            self.abort(st, f"context of {need} tokens exceeds the decode worker's KV capacity "
                           f"({d.ws.kv_capacity_tokens})")
            return
        st.active = True
        l_hist = min(st.router_tokens, prompt - 1) if st.router_worker is d else 0
        r = _Round(st, st.index, sent, max(0, l_hist), prompt - max(0, l_hist), rnd.output_tokens)
        task = PrefillTask(sid, st.index, r.l_hist, r.l_incr, self.now, decode_worker=d.ws.worker_id)
        task.sim_round = r  # the simulator's own handle; policies never look at it
        r.task = task
        if self.kv_connector == "none":
            route = Route("local", d.ws.worker_id, "no-kv-connector")
        else:
            route = self.maybe_migrate(r, task, d) or self.runner.route_prefill(task, self.cluster)
        r.route, r.worker = route.kind, route.worker
        self.counters[route.kind] += 1
        if self.count_inflight:  # the round's KV counts from the moment it is sent
            self.router_account(st, st.decode, need)
        if not self.reserve(st.decode, st):
            self.counters["memory_waits"] += 1
            st.decode.mem_wait.append(r)
            return
        self.enqueue(r)

    def maybe_migrate(self, r: _Round, task: PrefillTask, d: _Decode) -> Route | None:
        """The router's context migration: the bound worker's free KV (by the router's own accounting)
        is short of this round's increment plus its output → rebind to the live decode worker with the
        most free KV that fits the history too; the new worker reads the history from the old one."""
        ws = d.ws
        if not (task.l_hist > 0 and ws.kv_capacity_tokens > 0):
            return None
        need = task.l_incr + r.n_out
        if ws.kv_free_tokens >= need:
            return None
        others = [w for w in self.cluster.live_decode()
                  if w.worker_id != ws.worker_id and w.kv_free_tokens >= need + task.l_hist]
        if not others:
            return None
        new = self.decode[max(others, key=lambda w: w.kv_free_tokens).worker_id]
        st = r.sess
        sid = st.session.session_id
        self.cluster.bindings[sid] = new.ws.worker_id
        task.decode_worker = new.ws.worker_id
        r.migrate_from = d
        if st.evicted or sid not in d.resident:
            st.evicted = True  # nothing left to read on the old worker
        else:  # the engine state moves with the session
            d.idle.pop(sid, None)
            d.kv_used -= d.resident.pop(sid)
            st.migrating = True
        st.decode = new
        self.counters["migrations"] += 1
        self.counters["migrated_tokens"] += task.l_hist
        return Route("local", new.ws.worker_id, f"migrate-from-{ws.worker_id}")

    def reserve(self, d: _Decode, st: _Sess) -> bool:
        """Engine memory for the round; if it cannot fit, the session gives up its own cached history too
        (so waiting sessions never hold memory another waiting session needs)."""
        sid = st.session.session_id
        rnd = st.session.rounds[st.index]
        need = st.context + rnd.input_tokens + rnd.output_tokens
        d.idle.pop(sid, None)  # never evict the session we are making room for
        if self.make_room(d, need - d.resident.get(sid, 0)):
            self.hold(d, st, need)
            return True
        if sid in d.resident:
            d.kv_used -= d.resident.pop(sid)
            st.evicted = True
            self.counters["evictions"] += 1
            if self.make_room(d, need):
                self.hold(d, st, need)
                return True
        return False

    def hold(self, d: _Decode, st: _Sess, need: int) -> None:
        sid = st.session.session_id
        if sid not in d.resident and st.context and not st.migrating:
            st.evicted = True  # a session that arrives on this worker without its history here
        d.kv_used += need - d.resident.get(sid, 0)
        d.resident[sid] = need

    def make_room(self, d: _Decode, extra: int) -> bool:
        """Evict idle sessions (LRU first) until `extra` tokens fit; False if they cannot."""
        while d.kv_used + extra > d.ws.kv_capacity_tokens:
            if not d.idle:
                return False
            victim_id, victim = d.idle.popitem(last=False)
            d.kv_used -= d.resident.pop(victim_id)
            victim.evicted = True
            self.counters["evictions"] += 1
        return True

    def retry_memory(self, d: _Decode) -> None:
        while d.mem_wait:
            r = d.mem_wait[0]
            if not self.reserve(d, r.sess):
                return
            d.mem_wait.pop(0)
            self.enqueue(r)

    # -- the router's prefill queues (queues.PrefillQueues) -------------------------------------
    def enqueue(self, r: _Round) -> None:
        w = self.workers[r.worker]
        r.task.enqueue_time = self.now
        w.ws.queue.append(r.task)
        self.dispatch(w)

    def dispatch(self, w: _Worker) -> None:
        ws = w.ws
        while ws.queue and len(w.inflight) < w.slots:
            if len(ws.queue) > 1:
                self.runner.order_queue(ws, self.now)
            task = ws.queue.pop(0)
            w.inflight.append(task)
            ws.running = w.inflight[0]
            task.started_at = self.now
            self.execute(task.sim_round)

    def release(self, w: _Worker, task: PrefillTask) -> None:
        if task in w.inflight:
            w.inflight.remove(task)
            w.ws.running = w.inflight[0] if w.inflight else None
            self.dispatch(w)

    # -- executing a round ---------------------------------------------------------------------
    def engine_history(self, st: _Sess) -> int:
        """History the decode worker's engine really still holds for the session."""
        return 0 if st.evicted else st.context

    def execute(self, r: _Round) -> None:
        st = r.sess
        d = st.decode
        prompt = r.l_hist + r.l_incr
        hist = self.engine_history(st)
        st.migrating = False
        if hist < st.context:
            self.counters["reprefill_tokens"] += st.context - hist
            st.evicted = False
        if r.route == "remote":
            p = self.prefill[r.worker]
            arrive = p.engine.front_end(self.now)
            # vLLM: the history P lacks is read from the decode worker; SGLang: P recomputes it (kv_pricing).
            plan = remote_round(p.ws.layout.backend, prompt, hist, p.ws.cached_prefix.get(st.session.session_id, 0))
            read, start = plan.read, plan.start
            r.ship = plan.ship
            r.kv_bytes = (read + plan.ship) * self.kv_bytes_per_token
            r.computed = plan.compute
            job = Job(r, start, plan.compute, 1, self.prefill_done)
            if read:  # P asks D to export the history (a request on D: front end, one step), then reads it
                self.at(arrive, self.export_history, (job, hist, read))
            else:
                self.at(arrive, self.submit, (p.engine, job))
            return
        arrive = d.engine.front_end(self.now)
        t_in = 0.0
        old = r.migrate_from
        if old is not None and hist:
            t_in = self._t_kv(hist, old.ws.layout, d.ws.layout) + self.terms.export_s
            r.kv_bytes = hist * self.kv_bytes_per_token
        d.ws.decoding += 1
        r.computed = prompt - hist
        job = Job(r, hist, prompt - hist, r.n_out, self.first_token, self.round_done)
        self.at(arrive + t_in, self.submit, (d.engine, job))

    def export_history(self, arg: tuple[Job, int, int]) -> None:
        job, hist, read = arg
        d = job.rnd.sess.decode
        export = Job(job.rnd, max(0, hist - 1), min(1, hist), 1, lambda _e, now: self.read_history(job, read, now))
        self.at(d.engine.front_end(self.now), self.submit, (d.engine, export))

    def read_history(self, job: Job, read: int, now: float) -> None:
        r: _Round = job.rnd
        p, d = self.prefill[r.worker], r.sess.decode
        t_in = self.terms.export_s + self._t_kv(read, d.ws.layout, p.ws.layout)
        self.at(now + t_in, self.submit, (p.engine, job))

    def submit(self, arg: tuple[Engine, Job]) -> None:
        engine, job = arg
        engine.submit(job)

    def prefill_done(self, job: Job, now: float) -> None:
        """P's answer reaches the router: free P's slot, then the router calls D, which reads the KV."""
        r: _Round = job.rnd
        p = self.prefill[r.worker]
        self.cache_prefix(p, r.sess.session.session_id, job.cached + job.compute)
        self.release(p, r.task)
        d = r.sess.decode
        arrive = d.engine.front_end(now + self.terms.remote_s)
        total = job.cached + job.compute
        ship = job.compute if r.ship is None else r.ship
        t_in = self._t_kv(ship, p.ws.layout, d.ws.layout) if ship else 0.0
        d.ws.decoding += 1
        # D holds the whole prompt's KV after the read; vLLM still computes the last position.
        self.at(arrive + t_in, self.submit,
                (d.engine, Job(r, max(0, total - 1), min(1, total), r.n_out, self.first_token, self.round_done)))

    def cache_prefix(self, p: _Prefill, sid: str, tokens: int) -> None:
        cache = p.ws.cached_prefix
        p.cache_used += tokens - cache.pop(sid, 0)
        cache[sid] = tokens
        while p.cache_used > p.capacity and cache:
            _, dropped = cache.popitem(last=False)
            p.cache_used -= dropped

    def first_token(self, job: Job, now: float) -> None:
        """The first token is out: TTFT sample for the worker that prefilled, free the local slot."""
        r: _Round = job.rnd
        r.t_first = now
        prefiller = r.worker
        ttft = now - r.sent
        self.cluster.record_ttft(prefiller, now, ttft)
        self.runner.on_metrics(prefiller, "ttft", ttft, now)
        if r.route == "local":
            self.release(self.workers[r.worker], r.task)
        if r.n_out <= 1:
            self.round_done(job, now)

    def round_done(self, job: Job, now: float) -> None:
        r: _Round = job.rnd
        st = r.sess
        d = st.decode
        d.ws.decoding -= 1
        tpot = slo.tpot(r.t_first, now, r.n_out)
        self.records.append(slo.RoundRecord(
            session_id=st.session.session_id, round_index=r.index, ttft=r.t_first - r.sent, itl=tpot,
            input_tokens=r.computed, output_tokens=r.n_out,
            route=r.route, worker=r.worker, kv_bytes=r.kv_bytes, start=r.sent))
        self.last_round_end = max(self.last_round_end, now)
        if tpot is not None:
            self.cluster.record_itl(d.ws.worker_id, now, tpot)
            self.runner.on_metrics(d.ws.worker_id, "itl", tpot, now)
        self.runner.on_metrics(d.ws.worker_id, "output_tokens", r.n_out, now)
        self.router_account(st, d, r.l_hist + r.l_incr + r.n_out)
        rnd = st.session.rounds[st.index]
        st.context += rnd.input_tokens + rnd.output_tokens
        st.active = False
        st.index += 1
        sid = st.session.session_id
        if st.index < len(st.session.rounds):
            if sid in d.resident:
                d.idle[sid] = st  # evictable while the tool runs
            self.at(now + rnd.tool_delay_s, self.send_round, st)
        else:
            d.kv_used -= d.resident.pop(sid, 0)
            self.cluster.unbind_session(sid)
            if self.session_ttl_s < float("inf"):
                self.at(now + self.session_ttl_s, self.expire_session, st)
            self.session_done()
        if d.mem_wait:
            self.retry_memory(d)

    def router_account(self, st: _Sess, d: _Decode, tokens: int) -> None:
        """The router's `_finish`: the session's resident KV moves to (prompt + output) on its decode worker."""
        if st.router_worker is not None:
            old = st.router_worker.ws
            old.kv_used_tokens = max(0, old.kv_used_tokens - st.router_tokens)
        st.router_tokens, st.router_worker = tokens, d
        d.ws.kv_used_tokens += tokens

    def expire_session(self, st: _Sess) -> None:
        """The router forgets an idle session after its TTL, and only then counts its KV as released."""
        if st.router_worker is not None:
            ws = st.router_worker.ws
            ws.kv_used_tokens = max(0, ws.kv_used_tokens - st.router_tokens)
            st.router_tokens, st.router_worker = 0, None

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
        d.kv_used -= d.resident.pop(sid, 0)
        self.cluster.unbind_session(sid)
        self.session_done()
        if d.mem_wait:
            self.retry_memory(d)

    def session_done(self) -> None:
        self.done_sessions += 1
        if self.progress is not None and self.done_sessions % 256 == 0:
            self.progress(self.done_sessions, len(self.sessions))


ROUTER_SESSION_TTL_S = 1800.0  # RouterConfig.session_ttl_s: the router counts a session's KV this long


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
    serving: ServingTerms | None = None,
    kv_connector: str = "ampd",
    session_ttl_s: float = ROUTER_SESSION_TTL_S,
    count_inflight: bool = False,
) -> SimResult:
    """Run `workload` on `deployment` under `policy` (a registered name or a ready PolicyRunner).

    A policy given by name is built with `ttft_slo`, `itl_slo` and `seed` (when it accepts them) plus
    `policy_params`. `progress(done_sessions, total)` is called every 256 finished sessions.
    `serving` overrides the cost model's serving-path terms (`ServingTerms.for_model`); `kv_connector`
    "none" runs every prefill locally with no migration, as the router does without a connector.
    `session_ttl_s` and `count_inflight` set the router's KV accounting (today: finished sessions counted for
    1,800 s, a round counted only once it ends; `count_inflight=True` counts it from when it is sent).
    """
    if ttft_slo <= 0 or itl_slo <= 0:
        raise ValueError(f"SLOs must be positive, got ttft_slo={ttft_slo}, itl_slo={itl_slo}")
    if kv_connector not in ("ampd", "none"):
        raise ValueError(f"kv_connector must be 'ampd' or 'none', not {kv_connector!r}")
    if isinstance(policy, PolicyRunner):
        runner = policy
    else:
        accepted = accepted_params(policy_class(policy))
        base = {k: v for k, v in dict(ttft_slo=ttft_slo, itl_slo=itl_slo, seed=seed).items() if k in accepted}
        runner = load_policy(policy, cost_model, **{**base, **(policy_params or {})})
    terms = serving if serving is not None else ServingTerms.for_model(cost_model)
    started = time.perf_counter()
    sim = _Simulator(deployment, list(workload), runner, cost_model, progress, terms, kv_connector, session_ttl_s,
                     count_inflight)
    sim.run()
    if progress is not None:
        progress(sim.done_sessions, len(sim.sessions))
    return SimResult(sim.records, sim.counters, deployment, runner.name, time.perf_counter() - started)
