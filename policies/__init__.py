"""Policies: turn smoothed load and memory signals into a number of quantized layers.

Interface: `policy.decide(signals, state) -> Decision`, a pure function of its inputs
(the policy object holds only its validated config). Which layers follows the pack's
importance order; the controller executes the transition.
"""

from policies.base import Decision, PolicyState
from policies.config import PolicyConfig, load_policy
from policies.signals import Signals, SignalTracker, StepSample

__all__ = ["Decision", "PolicyState", "PolicyConfig", "load_policy", "Signals", "SignalTracker", "StepSample",
           "make_policy", "make_tracker"]


def make_policy(cfg: PolicyConfig, capacity_by_level: list[int], max_level: int,
                log_ratios: list[float] | None = None):
    """`log_ratios`: log(ppl_k / ppl_0) per level, for the demand policy's quality budget."""
    from policies.demand import DemandPolicy
    from policies.slo import SLOPolicy
    from policies.threshold import ThresholdPolicy

    if cfg.policy == "demand":
        return DemandPolicy(cfg, capacity_by_level, max_level, log_ratios)
    return {"threshold": ThresholdPolicy, "slo": SLOPolicy}[cfg.policy](cfg, capacity_by_level, max_level)


def make_tracker(cfg: PolicyConfig, num_layers: int, log_ratios: list[float] | None = None,
                 mix: list[dict[str, int]] | None = None, profile: dict | None = None,
                 plain_log_ratios: list[float] | None = None, twin_min_tokens: int | None = None,
                 prompt_twin_layers: int = 0) -> SignalTracker:
    """The signal tracker a policy needs: the demand policy also learns step times (seeded
    with the tiers' kernel `profile` over the ladder's tier `mix`, when given) and keeps the
    quality ledger (when the config sets a budget and the pack has a curve). With prompt
    twins (`twin_min_tokens`), the ledger charges steps the twins compute `log_ratios` and
    the others `plain_log_ratios`, and the step model prices a prompt below level
    `prompt_twin_layers` as one at that level."""
    from policies.quality_budget import QualityLedger
    from policies.step_model import StepTimeModel

    if cfg.policy != "demand":
        return SignalTracker(cfg.window_s, twin_min_tokens=twin_min_tokens)
    ledger = QualityLedger(cfg.quality_window_s) if log_ratios is not None else None
    model = StepTimeModel(num_layers, mix, profile, prompt_twin_layers=prompt_twin_layers)
    return SignalTracker(cfg.window_s, step_model=model, ledger=ledger,
                         log_ratios=log_ratios, plain_log_ratios=plain_log_ratios,
                         twin_min_tokens=twin_min_tokens)
