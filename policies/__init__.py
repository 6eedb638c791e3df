"""Policies: turn smoothed load and memory signals into a number of quantized layers.

Interface: `policy.decide(signals, state) -> Decision`, a pure function of its inputs
(the policy object holds only its validated config). Which layers follows the pack's
importance order; the controller executes the transition.
"""

from policies.base import Decision, PolicyState
from policies.config import PolicyConfig, load_policy
from policies.signals import Signals, SignalTracker, StepSample

__all__ = ["Decision", "PolicyState", "PolicyConfig", "load_policy", "Signals", "SignalTracker", "StepSample",
           "make_policy"]


def make_policy(cfg: PolicyConfig, capacity_by_level: list[int], max_level: int):
    from policies.slo import SLOPolicy
    from policies.threshold import ThresholdPolicy

    cls = {"threshold": ThresholdPolicy, "slo": SLOPolicy}[cfg.policy]
    return cls(cfg, capacity_by_level, max_level)
