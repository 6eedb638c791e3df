"""Every policy on synthetic load: a burst, a ramp, a sawtooth and noisy oscillation.

A small plant closes the loop: demand (in KV blocks) is exogenous; capacity follows the
policy's level; what does not fit waits, and the oldest waiter ages. The bound under test:
at most one transition per cooldown_s, except one more move up right after a paced move up
while requests wait for blocks (policies/base.py), and a restore only after calm_s of calm,
so over T seconds: transitions <= 2 x (T / cooldown_s + 1) and restores <= T / max(calm_s,
cooldown_s) + 1.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from policies import PolicyState, SignalTracker, StepSample, load_policy, make_policy, make_tracker
from policies.config import PolicyConfig, PolicyError, log_ppl_ratios

# SmolLM2 under the capacity-bound test budget: 9 blocks at FP16 .. 61 at 30 layers.
CAPACITY = [9, 10, 12, 14, 16, 17, 19, 21, 23, 24, 26, 28, 30, 31, 33, 35, 37, 38, 40, 42, 44, 46, 47, 49, 51,
            53, 54, 56, 58, 60, 61]
DT = 0.05  # one engine step
BLOCKS_PER_REQ = 3
# a synthetic quality curve: +20% perplexity with every layer quantized, linear in the level
QUALITY = {"orders": {"lis": {"ppl": {str(k): 20.0 * (1 + 0.2 * k / 30) for k in range(31)}}}}
RATIOS = log_ppl_ratios(QUALITY, 30)


REMAINING_TOKENS = 40


def simulate(policy, demand, seconds: float):
    """Arrivals follow the demand curve: requests that replace finished ones (a running
    request finishes after REMAINING_TOKENS steps) plus those that make demand grow."""
    tracker, state = make_tracker(policy.cfg, 30, RATIOS), PolicyState()
    previous_demand, arrived = None, 0.0
    levels, transitions, restores = [], 0, 0
    waiting_since = None
    for i in range(int(seconds / DT)):
        t = i * DT
        d = max(0, int(demand(t)))
        cap = CAPACITY[state.level]
        used = min(d, cap // BLOCKS_PER_REQ * BLOCKS_PER_REQ)
        waiting_blocks = d - used
        waiting_since = (waiting_since if waiting_since is not None else t) if waiting_blocks else None
        running = used // BLOCKS_PER_REQ
        growth = max(0, d - previous_demand) / BLOCKS_PER_REQ if previous_demand is not None else 0.0
        previous_demand = d
        before, arrived = arrived, arrived + running / REMAINING_TOKENS + growth
        arrivals = int(arrived) - int(before)
        sample = StepSample(time=t, waiting=waiting_blocks // BLOCKS_PER_REQ,
                            oldest_wait_s=t - waiting_since if waiting_since is not None else 0.0,
                            running=running, used_blocks=used, capacity_blocks=cap,
                            arrivals=arrivals, waiting_blocks=waiting_blocks, remaining_tokens=REMAINING_TOKENS,
                            running_need_blocks=used, waiting_need_blocks=waiting_blocks, tokens=running,
                            level=state.level)
        signals = tracker.add(sample)
        decision = policy.decide(signals, state)
        if decision.target != state.level:
            transitions += 1
            restores += decision.target < state.level
        state = decision.state
        levels.append(state.level)
    return levels, transitions, restores


def bound(cfg: PolicyConfig, seconds: float) -> tuple[int, int]:
    """The quick move up exists in `demand` only (with `quick_up`); elsewhere the strict bound."""
    paced = math.floor(seconds / max(cfg.cooldown_s, 1e-9)) + 1
    quick = cfg.policy == "demand" and cfg.quick_up
    return (2 if quick else 1) * paced, math.floor(seconds / max(cfg.calm_s, cfg.cooldown_s)) + 1


POLICIES = ["default", "accuracy", "performance"]


def _policy(name, budget: bool = False):
    """The shape tests check the anti-flapping rules, so by default without the quality
    budget over time (which may bring the level down under load; tested on its own)."""
    cfg, _ = load_policy(name)
    cfg = cfg.model_copy(update={"max_ppl_increase": None,  # no pack here: cap by fraction only
                                 **({} if budget else {"max_avg_ppl_increase": None})})
    return make_policy(cfg, CAPACITY, cfg.level_cap(30, None), RATIOS)


@pytest.mark.parametrize("name", POLICIES)
def test_burst_quantizes_then_restores_fully(name):
    policy = _policy(name)
    levels, transitions, _ = simulate(policy, lambda t: 45 if 2 <= t < 12 else 6, 40)
    burst = levels[int(2 / DT):int(12 / DT)]
    assert max(burst) > 0, "the burst must quantize"
    assert levels[-1] == 0, "after the burst it must restore fully"
    assert transitions <= bound(policy.cfg, 40)[0]


@pytest.mark.parametrize("name", POLICIES)
def test_ramp_only_goes_up(name):
    policy = _policy(name)
    levels, _, restores = simulate(policy, lambda t: 2 + 2 * t, 30)  # 2 -> 62 blocks
    assert restores == 0 and levels == sorted(levels) and levels[-1] == policy.max_level


@pytest.mark.parametrize("name", POLICIES)
def test_sawtooth_faster_than_calm_does_not_flap(name):
    policy = _policy(name)
    period = policy.cfg.calm_s * 0.75
    levels, transitions, restores = simulate(policy, lambda t: 40 if (t % period) < period / 2 else 5, 30)
    assert restores == 0, "load returns before calm_s has passed: no restore"
    assert transitions <= math.ceil(policy.max_level / policy.cfg.step_layers)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_oscillation_respects_the_bound(name, seed):
    policy = _policy(name)
    rng = random.Random(seed)
    seconds = 60.0
    levels, transitions, restores = simulate(policy, lambda t: 8 + rng.uniform(-4, 4), seconds)
    max_transitions, max_restores = bound(policy.cfg, seconds)
    assert transitions <= max_transitions and restores <= max_restores


def test_threshold_waits_for_calm_and_cooldown():
    cfg = PolicyConfig(policy="threshold", step_layers=4)
    policy = make_policy(cfg, CAPACITY, 15)
    tracker = SignalTracker(cfg.window_s)
    hot = tracker.add(StepSample(time=0.0, waiting=3, oldest_wait_s=0.5, running=3, used_blocks=9, capacity_blocks=9,
                                 waiting_blocks=9))
    d = policy.decide(hot, PolicyState())
    assert d.target == cfg.step_layers and "queue_delay" in d.reason
    again = policy.decide(dataclasses.replace(hot, time=0.1), d.state)
    assert again.target == d.target and "cooldown" in again.reason


def test_quality_guard_from_the_pack_curve():
    quality = {"orders": {"lis": {"ppl": {"0": 20.0, "1": 20.2, "2": 20.5, "3": 20.4, "4": 21.5}}}}
    cfg = PolicyConfig(policy="threshold", max_ppl_increase=0.03)
    assert cfg.level_cap(4, quality) == 3
    assert PolicyConfig(policy="threshold", max_level=1).level_cap(4, quality) == 1
    assert PolicyConfig(policy="threshold", max_level_fraction=0.5).level_cap(4, quality) == 2
    with pytest.raises(PolicyError):
        cfg.level_cap(4, None)


def test_the_old_cap_names_are_read_as_the_new_ones_with_a_warning(caplog):
    cfg = PolicyConfig.model_validate({"policy": "threshold", "max_quantized_layers": 1, "max_quantized_fraction": 0.5})
    assert cfg.max_level == 1 and cfg.max_level_fraction == 0.5
    assert "max_quantized_layers is deprecated" in caplog.text
    with pytest.raises(ValueError, match="give only max_level"):
        PolicyConfig.model_validate({"policy": "threshold", "max_quantized_layers": 1, "max_level": 2})


SLO_CFG = PolicyConfig(policy="slo", step_layers=8, cooldown_s=0.5, calm_s=4.0, slo_margin=0.7,
                       restore_margin=0.35, horizon_s=5.0)


def test_slo_policy_predicts_more_capacity_means_less_waiting():
    cfg = SLO_CFG
    policy = make_policy(cfg, CAPACITY, 30)
    tracker = SignalTracker(cfg.window_s)
    s = tracker.add(StepSample(time=0.0, waiting=10, oldest_wait_s=1.0, running=3, used_blocks=9, capacity_blocks=9,
                               waiting_blocks=30, remaining_tokens=50))
    s = tracker.add(StepSample(time=0.05, waiting=10, oldest_wait_s=1.05, running=3, used_blocks=9, capacity_blocks=9,
                               waiting_blocks=30, remaining_tokens=50))
    ttfts = [policy.predict_ttft(s, k) for k in (0, 15, 30)]
    assert ttfts[0] > ttfts[1] > ttfts[2]
    assert policy.decide(s, PolicyState()).target > 0


def test_slo_policy_quantizes_for_arrivals_the_current_capacity_cannot_serve():
    """Same queue, same memory: only the arrival rate differs. At level 0 the 3 slots serve
    1.5 requests/s; 3 requests/s over the 5 s horizon would queue 7.5 requests (a 5 s wait),
    so the predictive policy must quantize now, before any queue exists."""
    from policies import Signals

    cfg = SLO_CFG
    policy = make_policy(cfg, CAPACITY, 30)
    calm = Signals(time=10.0, queue_len=0.0, used_blocks=9, capacity_blocks=9, step_time_s=DT,
                   p95_tpot_s=DT, blocks_per_request=BLOCKS_PER_REQ, remaining_tokens=40, arrival_rate=0.0)
    assert policy.decide(calm, PolicyState()).target == 0
    busy = dataclasses.replace(calm, arrival_rate=3.0)
    assert policy.predict_ttft(busy, 0) > cfg.ttft_slo_s > policy.predict_ttft(calm, 0)
    decision = policy.decide(busy, PolicyState())
    assert decision.target > 0 and "layers needed" in decision.reason
