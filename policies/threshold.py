"""The paper's controller: quantize when KV usage or queue delay crosses its threshold,
restore last-in-first-out when the queue is empty and free blocks are plentiful.

Hysteresis: quantizing needs usage >= kv_high (or queue delay >= queue_delay_high_s, or
waiting prompts that do not fit in the free blocks); restoring needs an empty queue and
the blocks in use (plus waiting demand) to fit under kv_low of the *smaller* capacity, for
calm_s seconds. Between any two transitions lie at least cooldown_s seconds.
"""

from __future__ import annotations

from policies.base import Decision, PolicyBase, PolicyState


class ThresholdPolicy(PolicyBase):
    name = "threshold"

    def decide(self, signals, state: PolicyState) -> Decision:
        c, now = self.cfg, signals.time
        free = signals.capacity_blocks - signals.used_blocks
        triggers = []
        if signals.kv_usage >= c.kv_high:
            triggers.append(f"kv_usage {signals.kv_usage:.2f} >= {c.kv_high}")
        if signals.queue_delay_s >= c.queue_delay_high_s:
            triggers.append(f"queue_delay {signals.queue_delay_s:.3f}s >= {c.queue_delay_high_s}s")
        if signals.waiting_blocks > free:
            triggers.append(f"waiting prompts need {signals.waiting_blocks} blocks, {free} free")
        if triggers:
            return self._up(state, now, state.level + c.step_layers, "; ".join(triggers))
        lower = max(0, state.level - c.step_layers)
        safe = signals.queue_len == 0 and self.fits_after_restore(signals, lower, c.kv_low)
        return self._down(state, now, safe, f"calm: queue empty, {signals.used_blocks} blocks in use fit "
                                            f"under kv_low at {lower} layers")
