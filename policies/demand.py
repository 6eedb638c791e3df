"""Demand: go to the level the demand needs in one transition, as long as the batch it
admits still meets the TPOT SLO and the quality budget over time allows it.

Demand, in KV blocks: what the running and waiting requests will hold when they finish
(prompt + expected output), plus the requests that arrive over `horizon_s` faster than the
running ones finish. The target is the smallest level whose capacity covers demand x
(1 + headroom), reached in one plan rather than a staircase of `step_layers`, because a
burst is seconds old by the time a staircase arrives. Three limits, tightest first:
- the hard cap (the quality guard: fraction, layers, max_ppl_increase);
- the quality budget over time (`max_avg_ppl_increase`, token-weighted over
  `quality_window_s`): a level is allowed while serving the next horizon's tokens at it
  keeps the window's average inside the budget; if the average drifts past it, the level
  comes down even under load;
- compute: the learned step-time model predicts the decode step at each level with the
  batch that level's capacity admits; a level whose predicted step breaks the TPOT SLO
  (times `slo_margin`) is not taken, because there more KV only trades TTFT violations
  for TPOT ones. And while the mean step of the last `window_s`, prefill chunks included,
  already breaks that bound, the level does not go up at all: each admitted prompt's
  prefill lands between every running request's tokens (measured on a prefill-heavy
  trace, quantizing past that point turned TTFT violations into TPOT ones). A level the model has not measured borrows a lower level's fit: the cost of the
  bigger batch is extrapolated, the quantized kernel's own cost is learned once the
  level has run. Before any data it does not limit.
Compute relief: where a quantized kernel is *faster* than bf16 (int8 on a CPU without
AMX), a higher level also relieves compute. While the mean step breaks the bound, the
policy goes to the level (within the quality limits) whose own measured step, at the
present batch, is the lowest and at least `RELIEF` below the present level's; only levels
the step model has measured count, never an extrapolated one.
Restores go to the smallest level whose capacity covers the present demand x (1 +
restore_headroom) (the gap to `headroom`, and leaving out projected arrivals, is the
hysteresis), only with an empty queue held for `calm_s`.
"""

from __future__ import annotations

from policies.base import Decision, PolicyBase, PolicyState

RELIEF = 0.10  # a measured level must beat the present step by this fraction to be taken for speed


class DemandPolicy(PolicyBase):
    name = "demand"

    def __init__(self, cfg, capacity_by_level: list[int], max_level: int, log_ratios: list[float] | None = None):
        super().__init__(cfg, capacity_by_level, max_level)
        # the dearest level at or below each k: the quality budget must hold on the way up too
        self.envelope: list[float] | None = None
        if log_ratios is not None:
            self.envelope, worst = [], 0.0
            for r in log_ratios[: len(capacity_by_level)]:
                worst = max(worst, r)
                self.envelope.append(worst)

    # -- the three terms ---------------------------------------------------------------
    def demand_blocks(self, s, projected: bool = True) -> float:
        """`projected`: add the arrivals over the horizon that outpace completions. One
        arrival moves the rate estimate by 1 / window_s, so a surplus below that is noise,
        not load, and is not projected (else it alone could hold layers quantized)."""
        present = max(s.need_blocks, s.used_blocks + s.waiting_blocks)
        if not projected:
            return present
        per_request = s.need_per_request or s.blocks_per_request or 1.0
        step = s.step_time_s or 0.05
        finishing = s.running / max(s.remaining_tokens * step, 1e-3) if s.running else 0.0  # requests/s
        surplus = s.arrival_rate - finishing - 1.0 / self.cfg.window_s
        return present + max(0.0, surplus) * self.cfg.horizon_s * per_request

    def level_for(self, demand: float, headroom: float, top: int) -> int:
        for k in range(0, top + 1):
            if self.capacity[k] >= demand * (1 + headroom):
                return k
        return top

    def quality_limit(self, s) -> int:
        budget = self.cfg.max_avg_ppl_increase
        if budget is None or self.envelope is None or s.ledger is None:
            return self.max_level
        upcoming = max(s.token_rate, 1.0) * self.cfg.horizon_s
        allowed = 0
        for k in range(0, self.max_level + 1):
            if not s.ledger.allows(self.envelope[k], upcoming, budget):
                break
            allowed = k
        return allowed

    def predicted_step(self, s, level: int) -> float | None:
        model = s.step_model
        if model is None:
            return None
        per_request = s.need_per_request or s.blocks_per_request or 1.0
        wanting = s.running + s.queue_len + s.arrival_rate * self.cfg.horizon_s
        batch = max(1.0, min(wanting, self.capacity[level] / per_request))
        return model.predict(level, batch)

    def compute_limit(self, s, level: int, target: int) -> tuple[int, str]:
        bound = self.cfg.tpot_slo_s * self.cfg.slo_margin
        if s.step_time_s > bound:
            # What requests feel now, prefill chunks included: more admissions only add
            # prefills between everyone's tokens.
            return level, f"; compute-bound: mean step {s.step_time_s:.3f}s > {bound:.3f}s now"
        for k in range(level + 1, target + 1):
            step = self.predicted_step(s, k)
            if step is not None and step > bound:
                return k - 1, f"; compute-bound above {k - 1}: predicted step {step:.3f}s at {k} > {bound:.3f}s"
        return target, ""

    def compute_relief(self, s, level: int, top: int) -> tuple[int, str]:
        """The level, at or below `top`, whose measured step at the present batch is the
        fastest and beats the present level's by RELIEF; `level` if none."""
        bound = self.cfg.tpot_slo_s * self.cfg.slo_margin
        model = s.step_model
        if model is None or s.step_time_s <= bound or not model.known(level):
            return level, ""
        batch = max(1.0, float(s.running))
        here = model.predict(level, batch)
        best, best_step = level, here * (1 - RELIEF)
        for k in range(0, top + 1):
            if k != level and model.known(k) and model.bucket(k) != model.bucket(level):
                step = model.predict(k, batch)
                if step < best_step:
                    best, best_step = k, step
        if best == level:
            return level, ""
        return best, f"compute relief: measured step {best_step:.3f}s at {best} vs {here:.3f}s at {level}"

    # -- the decision ----------------------------------------------------------------------
    def decide(self, s, state: PolicyState) -> Decision:
        c, now, level = self.cfg, s.time, state.level
        demand = self.demand_blocks(s)
        quality_top = self.quality_limit(s)
        if level > self.max_level:
            return self._down(state, now, True, "above the quality cap")
        if level > quality_top:  # the budget over time is spent: come down even under load
            return self._down_to(state, now, quality_top,
                                 f"quality budget: {s.quality_increase:.1%} average increase, "
                                 f"{c.max_avg_ppl_increase:.1%} allowed; at most {quality_top} layers",
                                 need_calm=False)
        need = self.level_for(demand, c.headroom, quality_top)
        relief, relief_note = self.compute_relief(s, level, quality_top)
        if relief > max(level, need):
            return self._up(state, now, relief, relief_note)
        if need > level:
            target, compute_note = self.compute_limit(s, level, need)
            reason = (f"demand {demand:.0f} blocks (+{c.headroom:.0%}) > capacity {self.capacity[level]} at "
                      f"{level} layers; {need} layers cover it{compute_note}")
            if target <= level:
                return Decision(level, f"hold: {reason}", PolicyState(level, state.last_change, None))
            return self._up(state, now, target, reason)
        # calm at `lower`: the present demand fits it with the wider restore headroom, and
        # the projected demand fits it too (so a burst still arriving resets the calm)
        present = self.demand_blocks(s, projected=False)
        lower = max(self.level_for(present, c.restore_headroom, level), need,
                    min(relief, level) if relief_note else 0)  # a level kept for speed is not restored
        safe = lower < level and s.queue_len == 0 and s.waiting_blocks == 0
        return self._down_to(state, now, lower if safe else level,
                             f"calm: demand {present:.0f} blocks fits {self.capacity[lower]} at {lower} layers "
                             f"with {c.restore_headroom:.0%} headroom")
