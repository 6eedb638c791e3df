"""What every policy shares: explicit state, the decision record, and the anti-flapping
rules (cooldown between transitions; a restore needs `calm_s` of calm first).

One exception to the cooldown, and why: a move up sized from the demand at one boundary can
be one request short at the next (a prompt arrives just after it). Waiting out the cooldown
then holds that prompt in the queue for up to `cooldown_s` (measured: 2.34 s to first token
against a 2 s SLO on an AVX2-only EPYC, 0.5 s of it the cooldown). Two moves up in a row
are not flapping, so a move up that waited out the cooldown may be followed at once by one
more move up while requests wait for blocks; the one after that waits again. Over T seconds
that allows at most 2 x (T/`cooldown_s` + 1) transitions; restores are never quick.
`quick_up: false` restores the strict bound, T/`cooldown_s` + 1."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PolicyState:
    level: int = 0  # quantized layers now
    last_change: float = float("-inf")  # time of the last transition
    calm_since: float | None = None  # since when restoring has looked safe
    busy_at: float = float("-inf")  # the last boundary with requests running, waiting or prefilling
    paced_up: bool = False  # the last transition was a move up that waited out the cooldown


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

    def admission(self, signals, level: int) -> int | None:
        """The most requests that may run at once at `level`; None: as many as vLLM admits
        (the demand policy can cap it: policies.admission)."""
        return None

    def moves_while_idle(self) -> bool:
        """Whether the policy may move up while nothing runs (the demand policy's
        `idle_rest: next_request`): the controller then gives it idle boundaries at its floor."""
        return False

    def token_budget(self, signals, level: int) -> int | None:
        """Tokens the next step may schedule at `level`; None: vLLM's own budget (the demand
        policy can lower it while requests decode: policies.step_budget)."""
        return None

    # -- shared rules ------------------------------------------------------------------
    def _up(self, state: PolicyState, now: float, target: int, reason: str, blocked: bool = False) -> Decision:
        """`blocked`: requests wait for KV blocks now (the one case a move up may follow a
        paced move up without waiting out the cooldown)."""
        target = min(max(target, state.level), self.max_level)
        if target == state.level:
            return Decision(state.level, f"hold: at the cap ({self.max_level}) despite {reason}",
                            replace(state, calm_since=None))
        paced = now - state.last_change >= self.cfg.cooldown_s
        if not paced and not (blocked and state.paced_up and self.cfg.quick_up):
            return Decision(state.level, f"hold: cooldown ({reason})", replace(state, calm_since=None))
        if not paced:
            reason += f"; {now - state.last_change:.2f}s after a move up, requests waiting for blocks"
        return Decision(target, reason, PolicyState(target, now, None, paced_up=paced))

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
