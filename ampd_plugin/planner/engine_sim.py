"""One simulated engine replica, stepping the way vLLM V1's scheduler does.

Why a separate model: the user-visible latencies depend on how an engine packs work into forward passes.
vLLM V1 runs one step at a time; a step carries one token for every running decode and as many prompt
tokens of waiting prefills as the token budget (`max_num_batched_tokens`) leaves, first come first served,
a long prompt split into chunks over several steps. So a local prefill on a decode worker *slows* the
decode batch's steps (mixed prefill+decode steps) instead of pausing it, and a prefill worker batches
several prefills into one step when the router lets more than one in.

Step time (cost model `T_pre`, `T_dec`; `pre_var(h, c) = T_pre(h, c) − T_pre(0, 1)`, the part of a prefill
that grows with its tokens):
    decode batch of b > 0 seqs reading ctx KV tokens + chunks: T_dec(b, ctx) + Σ pre_var(h_i, c_i)
    prefill-only step:                                          pass + Σ pre_var(h_i, c_i)
where `pass = T_pre(0, 1)` minus the front-end time when the profile's T_pre includes it (a profile times
prefills through the API server; the front end is simulated as its own FIFO server, `front_end`).
A prefill's first token is out at the end of the step that computed its last chunk.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Callable

from ampd_plugin.planner.serving import ServingTerms


@dataclass
class Job:
    """One request inside an engine: prefill `compute` prompt tokens on top of `cached`, then (n_out > 1)
    decode n_out − 1 more tokens."""

    rnd: Any
    cached: int
    compute: int
    n_out: int
    on_first: Callable[["Job", float], None]
    on_done: Callable[["Job", float], None] | None = None
    done_tokens: int = 0
    end_step: int = 0
    ctx0: int = 0


@dataclass
class Engine:
    """Step loop of one replica. `at(t, fn, arg)` schedules simulator events."""

    layout: Any
    cost: Any
    terms: ServingTerms
    at: Callable[[float, Callable, Any], None]
    clock: Callable[[], float]
    busy: bool = False
    step_no: int = 0
    ctx_sum: int = 0
    waiting: list = field(default_factory=list)  # jobs still prefilling, in admission order
    batch: list = field(default_factory=list)  # heap of (end_step, seq, Job)
    seq: int = 0
    fe_free_at: float = 0.0
    steps: int = 0
    mixed_steps: int = 0

    def __post_init__(self) -> None:
        self._t_pre = self.cost.t_pre
        self._t_dec = self.cost.t_dec
        base = self._t_pre(0, 1, self.layout)
        self._pre_base = base
        fe = self.terms.frontend_s if self.terms.frontend_in_t_pre else 0.0
        self.pass_s = max(0.0, base - fe)

    @property
    def decoding(self) -> int:
        return len(self.batch)

    def front_end(self, now: float) -> float:
        """A request reaches the API server at `now`: when it leaves the (FIFO, one-at-a-time) front end."""
        start = max(now, self.fe_free_at)
        self.fe_free_at = start + self.terms.frontend_s
        return self.fe_free_at

    def pre_var(self, cached: int, tokens: int) -> float:
        return max(0.0, self._t_pre(cached, tokens, self.layout) - self._pre_base)

    def submit(self, job: Job) -> None:
        self.waiting.append(job)
        if not self.busy:
            self.start_step()

    def step_time(self, chunks: list[tuple[Job, int]]) -> float:
        b = len(self.batch)
        t = self._t_dec(b, self.ctx_sum, self.layout) if b else self.pass_s
        for job, c in chunks:
            t += self.pre_var(job.cached + job.done_tokens, c)
        return t

    def start_step(self) -> None:
        if self.busy:
            return
        left = self.terms.token_budget - len(self.batch)
        chunks: list[tuple[Job, int]] = []
        for job in self.waiting:
            if left <= 0:
                break
            c = min(job.compute - job.done_tokens, left)
            chunks.append((job, c))
            left -= c
        if not self.batch and not chunks:
            return
        self.busy = True
        self.steps += 1
        if chunks and self.batch:
            self.mixed_steps += 1
        self.at(self.clock() + self.step_time(chunks), self.step_done, chunks)

    def step_done(self, chunks: list[tuple[Job, int]]) -> None:
        now = self.clock()  # busy stays set while callbacks run: jobs they submit wait for the next step
        self.step_no += 1
        batch = self.batch
        self.ctx_sum += len(batch)
        while batch and batch[0][0] <= self.step_no:
            _, _, job = heapq.heappop(batch)
            self.ctx_sum -= job.ctx0 + job.n_out - 1
            job.on_done(job, now)
        for job, c in chunks:
            job.done_tokens += c
            if job.done_tokens >= job.compute:
                self.waiting.remove(job)
                job.on_first(job, now)
                if job.n_out > 1:
                    job.end_step = self.step_no + job.n_out - 1
                    job.ctx0 = job.cached + job.compute
                    self.ctx_sum += job.ctx0
                    self.seq += 1
                    heapq.heappush(batch, (job.end_step, self.seq, job))
        self.busy = False
        self.start_step()
