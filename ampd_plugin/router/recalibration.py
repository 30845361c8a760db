"""Online recalibration: the live router compares what each round measured with what the cost model
predicted, and now and then refits the model's constants (`ampd_plugin.refit`) so the policy's
predictions track the hardware it runs on.

Off unless enabled (`refit_online`, or `--refit-out PATH`). Bounded on every side: observations are kept
in a ring (`max_samples`), a refit runs at most every `interval_s` and only on `min_samples` new
observations, each step may move a coefficient by at most `max_step` (×(1 ± max_step)), every change is
logged with the errors before and after, and with `out_path` the refitted model is written as a profile
YAML (what `ampd-plugin profile` writes, the refit history under `meta.refit`), loadable with `--profile`.

What is observed, per successful round (the definitions of `slo.py`):
- prefill: TTFT minus the router-queue wait against `t_pre(l_hist, l_incr)` on the prefilling worker's
  layout (it includes the serving path and, for remote rounds, the KV read-back: what the policy needs);
- decode: the round's TPOT against `t_dec(batch, context)` on the decode worker's layout, the batch being
  the rounds decoding there when the round ended, the context the round's prompt plus half its output.
The live model is updated in place, so the policy and the router (which share the object) use it at once.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Callable

from ampd_plugin.costmodel import CostModel, FittedCostModel
from ampd_plugin.refit import Bounds, Observation, refit
from ampd_plugin.router.context import RoundCtx
from ampd_plugin.router_policy.state import ClusterState

log = logging.getLogger("ampd.router.refit")


class OnlineRefit:
    def __init__(self, model: CostModel, cluster: ClusterState, *, min_samples: int = 50, max_step: float = 0.25,
                 interval_s: float = 60.0, max_samples: int = 2000, out_path: str | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if not isinstance(model, FittedCostModel):
            raise ValueError("online recalibration needs a fitted cost model (--profile from `ampd-plugin profile`), "
                             f"not {type(model).__name__}")
        if not 0 < max_step < 1:
            raise ValueError(f"refit max_step must be in (0, 1), got {max_step}")
        if min_samples < 1 or max_samples < min_samples:
            raise ValueError("refit needs 1 <= min_samples <= max_samples")
        import time

        self.model, self.cluster = model, cluster
        self.bounds = Bounds(low=1.0 - max_step, high=1.0 + max_step, min_samples=min_samples)
        self.interval_s = interval_s
        self.out_path = out_path
        self._clock = clock or time.monotonic
        self._obs: collections.deque[Observation] = collections.deque(maxlen=2 * max_samples)  # two per round
        self._new = 0
        self._last = self._clock()
        self.refits = 0
        self.last_changes: list[dict] = []

    def __len__(self) -> int:
        return len(self._obs)

    # ----------------------------------------------------------------------------- observing
    def observe(self, ctx: RoundCtx, ttft: float | None, tpot: float | None, n_out: int) -> None:
        """A successful round's measurements (`RoundAccounting` observer)."""
        task = ctx.task
        if task is None:
            return
        self._new += 1  # rounds, not observations: `min_samples` rounds between refits
        try:
            if ttft is not None and ctx.ttft_source != "predicted":  # a predicted TTFT is the model's own figure
                w = self.cluster.worker(ctx.prefiller)
                measured = ttft - ctx.queue_wait
                predicted = self.model.t_pre(task.l_hist, max(1, task.l_incr), w.layout)
                self._add(Observation("prefill", (task.l_hist, max(1, task.l_incr)), measured, w.layout, predicted))
            if tpot is not None and n_out >= 2:
                d = self.cluster.decode[ctx.decode]
                batch = max(1, d.decoding + 1)  # this round had ended already: count it
                context = ctx.prompt_tokens + n_out // 2
                predicted = self.model.t_dec(batch, context, d.layout)
                self._add(Observation("decode", (batch, context), tpot, d.layout, predicted))
        except (KeyError, ValueError) as exc:  # a layout the profile lacks: nothing to learn from
            log.debug("refit: round not observed (%s)", exc)

    def _add(self, ob: Observation) -> None:
        self._obs.append(ob)

    # ------------------------------------------------------------------------------- refitting
    def maybe_refit(self) -> bool:
        """Refit when the interval passed and enough new rounds arrived; True if a coefficient changed."""
        now = self._clock()
        if now - self._last < self.interval_s or self._new < self.bounds.min_samples:
            return False
        self._last, self._new = now, 0
        result = refit(self.model, list(self._obs), self.bounds)
        self.refits += 1
        self.last_changes = result.changes
        for c in result.changes:
            log.warning("online refit %s on %d rounds: mean relative error %.1f%% -> %.1f%% (%s -> %s)", c["term"],
                        c["samples"], 100 * c["error_before"], 100 * c["error_after"], _fmt(c["before"]), _fmt(c["after"]))
        for s in result.skipped:
            log.info("online refit: %s", s)
        if not result.changes:
            return False
        # In place: the policy and the router hold this very object.
        self.model.layouts, self.model.links, self.model.meta = result.model.layouts, result.model.links, result.model.meta
        if self.out_path:  # written whole, then renamed: a reader never sees half a profile
            tmp = Path(self.out_path + ".tmp")
            tmp.write_text(self.model.to_yaml(), encoding="utf-8")
            tmp.replace(self.out_path)
            log.info("online refit: profile written to %s", self.out_path)
        return True


def _fmt(theta: list[float]) -> str:
    return "(" + ", ".join(f"{t:.4g}" for t in theta) + ")"
