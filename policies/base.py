"""What every policy shares: explicit state, the decision record, and the anti-flapping
rules (cooldown between transitions; a restore needs `calm_s` of calm first)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PolicyState:
    level: int = 0  # quantized layers now
    last_change: float = float("-inf")  # time of the last transition
    calm_since: float | None = None  # since when restoring has looked safe
    busy_at: float = float("-inf")  # the last boundary with requests running, waiting or prefilling


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str
    state: PolicyState


class PolicyBase:
    name = "base"

    def __init__(self, cfg, capacity_by_level: list[int], max_level: int):
        self.cfg = cfg
        self.capacity = capacity_by_level
        self.max_level = max(0, min(max_level, len(capacity_by_level) - 1))

    def decide(self, signals, state: PolicyState) -> Decision:
        raise NotImplementedError

    # -- shared rules ------------------------------------------------------------------
    def _up(self, state: PolicyState, now: float, target: int, reason: str) -> Decision:
        target = min(max(target, state.level), self.max_level)
        if target == state.level:
            return Decision(state.level, f"hold: at the cap ({self.max_level}) despite {reason}",
                            replace(state, calm_since=None))
        if now - state.last_change < self.cfg.cooldown_s:
            return Decision(state.level, f"hold: cooldown ({reason})", replace(state, calm_since=None))
        return Decision(target, reason, PolicyState(target, now, None))

    def _down(self, state: PolicyState, now: float, safe: bool, reason: str) -> Decision:
        if state.level > self.max_level:  # the cap was lowered: go down regardless of load
            return Decision(self.max_level, "above the quality cap", PolicyState(self.max_level, now, None))
        if not safe or state.level == 0:
            return Decision(state.level, "hold", replace(state, calm_since=None))
        calm_since = state.calm_since if state.calm_since is not None else now
        if now - calm_since < self.cfg.calm_s or now - state.last_change < self.cfg.cooldown_s:
            return Decision(state.level, "hold: waiting for calm", replace(state, calm_since=calm_since))
        target = max(0, state.level - self.cfg.step_layers)
        return Decision(target, reason, PolicyState(target, now, None))

    def _down_to(self, state: PolicyState, now: float, target: int, reason: str, need_calm: bool = True) -> Decision:
        """Restore to `target` in one plan: after calm_s of calm (unless the quality budget
        forces it) and never within cooldown_s of the last transition."""
        if target >= state.level:
            return Decision(state.level, "hold", replace(state, calm_since=None))
        calm_since = state.calm_since if state.calm_since is not None else now
        waiting = need_calm and now - calm_since < self.cfg.calm_s
        if waiting or now - state.last_change < self.cfg.cooldown_s:
            return Decision(state.level, "hold: waiting for calm" if waiting else "hold: cooldown",
                            replace(state, calm_since=calm_since))
        return Decision(target, reason, PolicyState(target, now, None))

    def fits_after_restore(self, signals, level: int, fraction: float) -> bool:
        """Would the blocks in use stay under `fraction` of the capacity at `level`?"""
        return signals.used_blocks + signals.waiting_blocks <= fraction * self.capacity[level]
