"""Predictive: pick the fewest quantized layers whose predicted p95 TTFT and TPOT stay
under the SLOs (times `slo_margin`).

The model, per candidate level k (capacity C_k blocks):
- concurrency n_k = C_k / blocks_per_request (observed; a request holds its blocks while
  it decodes), service rate mu_k = n_k / (remaining_tokens * step_time) requests/s;
- the queue now (Q requests) plus arrivals over `horizon_s` at the observed rate lam:
  backlog = Q + max(0, lam - mu_k) * horizon_s, and the last request in it waits
  backlog / mu_k; predicted TTFT = that wait + one step for its prefill;
- predicted TPOT = the observed p95 step time (the level changes memory, not step cost,
  within the precision of this model; docs/RESULTS.md shows where that fails on CPUs
  without AMX, where the W4 kernel is slower than bf16 at larger batches).
Restoring uses the same prediction against the tighter `restore_margin` (hysteresis).
"""

from __future__ import annotations

from policies.base import Decision, PolicyBase, PolicyState


class SLOPolicy(PolicyBase):
    name = "slo"

    def predict_ttft(self, signals, level: int) -> float:
        step = max(signals.step_time_s, 1e-3)
        per_req = max(signals.blocks_per_request, 1.0)
        remaining = max(signals.remaining_tokens, 1.0)
        slots = max(self.capacity[level] / per_req, 1.0)
        mu = slots / (remaining * step)
        backlog = signals.queue_len + max(0.0, signals.arrival_rate - mu) * self.cfg.horizon_s
        return backlog / mu + step

    def decide(self, signals, state: PolicyState) -> Decision:
        c, now = self.cfg, signals.time
        tpot_ok = signals.p95_tpot_s <= c.tpot_slo_s * c.slo_margin
        need = None
        for k in range(0, self.max_level + 1):
            if self.predict_ttft(signals, k) <= c.ttft_slo_s * c.slo_margin and self.fits_after_restore(signals, k, 1.0):
                need = k
                break
        if need is None:
            need = self.max_level
        predicted = self.predict_ttft(signals, state.level)
        if need > state.level:
            # round up to whole steps so one transition covers the predicted need
            steps = -(-(need - state.level) // c.step_layers)
            return self._up(state, now, state.level + steps * c.step_layers,
                            f"predicted TTFT {predicted:.2f}s at {state.level} layers > "
                            f"{c.slo_margin:.0%} of {c.ttft_slo_s}s; {need} layers needed")
        lower = max(0, state.level - c.step_layers)
        safe = (self.predict_ttft(signals, lower) <= c.ttft_slo_s * c.restore_margin and tpot_ok
                and self.fits_after_restore(signals, lower, c.kv_low))
        return self._down(state, now, safe, f"predicted TTFT {self.predict_ttft(signals, lower):.2f}s at "
                                            f"{lower} layers <= {c.restore_margin:.0%} of the SLO")
