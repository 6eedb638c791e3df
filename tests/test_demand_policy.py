"""The demand policy's own terms, on synthetic signals (plain Python, milliseconds):
the jump to the need in one transition, the learned step-time limit on both kinds of CPU
with one config, the quality budget over time, and the hysteresis between headrooms."""

from __future__ import annotations

import dataclasses
import math

from policies import PolicyState, Signals, make_policy
from policies.config import PolicyConfig, log_ppl_ratios
from policies.quality_budget import QualityLedger
from policies.step_model import StepTimeModel
from tests.test_policies import CAPACITY, DT, QUALITY, RATIOS, simulate

CFG = PolicyConfig(policy="demand", headroom=0.1, restore_headroom=0.3, horizon_s=3.0, cooldown_s=1.0, calm_s=3.0,
                   tpot_slo_s=0.2, slo_margin=0.8)


def demand_policy(cfg=CFG, cap=30):
    return make_policy(cfg, CAPACITY, cap, RATIOS)


def busy(need_blocks=45, **kw) -> Signals:
    """A queue that the 9 blocks at level 0 cannot hold: 15 requests of 3 blocks."""
    base = dict(time=10.0, queue_len=12.0, used_blocks=9, capacity_blocks=9, waiting_blocks=36, running=3,
                need_blocks=need_blocks, need_per_request=3.0, blocks_per_request=3.0, step_time_s=DT,
                remaining_tokens=40, arrival_rate=0.0, token_rate=60.0)
    return Signals(**{**base, **kw})


def test_a_burst_is_met_in_one_transition_where_the_paper_climbs_a_staircase():
    need = next(k for k, c in enumerate(CAPACITY) if c >= 45 * 1.1)
    d = demand_policy().decide(busy(), PolicyState())
    assert d.target == need and d.reason.startswith("capacity:")

    def first_time_at(levels, level):
        return next(i for i, k in enumerate(levels) if k >= level) * DT

    demand = lambda t: 45 if 2 <= t < 12 else 6  # noqa: E731
    jumped, _, _ = simulate(demand_policy(), demand, 8)
    staircase = make_policy(PolicyConfig(policy="threshold", step_layers=4, cooldown_s=1.0), CAPACITY, 30)
    stepped, _, _ = simulate(staircase, demand, 12)
    # demand 45 needs 24 layers (49 blocks): one boundary after the burst for the jump,
    # five cooldowns for the staircase
    first_change = next(k for k in jumped if k)
    assert first_time_at(jumped, 24) - 2 <= 2 * DT and first_change >= 24
    assert first_time_at(stepped, 24) - 2 >= 4 * staircase.cfg.cooldown_s


def test_arrivals_alone_raise_the_level_before_any_queue():
    calm = busy(need_blocks=6, queue_len=0.0, waiting_blocks=0, used_blocks=6, running=2)
    assert demand_policy().decide(calm, PolicyState()).target == 0
    # 4 requests/s arrive; 2 running ones finish at 1/s; less the noise floor (0.5/s), a
    # surplus of 2.5/s over 3 s is 7.5 requests of 3 blocks
    rising = dataclasses.replace(calm, arrival_rate=4.0)
    d = demand_policy().decide(rising, PolicyState())
    assert d.target > 0 and CAPACITY[d.target] >= (6 + 2.5 * 3 * 3) * 1.1 > CAPACITY[d.target - 1]


def _model(quantized_cost_per_request: float) -> StepTimeModel:
    """Level 0 learned at batches 2..6 (20 ms + 6 ms per request); the top third of the
    levels learned with its own cost per request."""
    m = StepTimeModel(30)
    for i in range(60):
        n = 2 + i % 5
        m.observe(0, n, 0.02 + 0.006 * n)
        m.observe(30, n, 0.02 + quantized_cost_per_request * n)
    return m


def test_the_step_time_model_stops_quantizing_where_the_batch_breaks_tpot():
    """One config, two CPUs: where a quantized layer is dear (bf16 with AMX against a 4-bit
    kernel) the level stops where the batch it admits would break 80% of the TPOT SLO;
    where it is cheap (int8 without AMX) the same config goes to the full need. Only
    levels 0 and 30 were served: the levels between borrow level 0's line (the batch's
    cost), and level 30 its own."""
    policy = demand_policy()
    dear = busy(step_model=_model(0.012), need_blocks=55, waiting_blocks=46)
    cheap = busy(step_model=_model(0.004), need_blocks=55, waiting_blocks=46)
    need = next(k for k, c in enumerate(CAPACITY) if c >= 55 * 1.1)
    assert need == 30
    assert policy.decide(cheap, PolicyState()).target == need
    d_dear = policy.decide(dear, PolicyState())
    bound = CFG.tpot_slo_s * CFG.slo_margin
    # level 30 at 12 ms per request breaks the bound with the 20 requests it admits; the
    # most capacity whose step meets it is the highest level on level 0's line that does
    assert d_dear.target < need and d_dear.reason.startswith("speed:")
    assert policy.predicted_step(dear, d_dear.target) <= bound < policy.predicted_step(dear, need)


def test_a_bigger_batch_alone_can_make_a_level_compute_bound():
    """Only level 0 measured, at 25 ms + 10 ms per request: a level whose capacity admits
    more than 13.5 requests would break 80% of the TPOT SLO, whatever its kernel."""
    m = StepTimeModel(30)
    for i in range(60):
        n = 2 + i % 5
        m.observe(0, n, 0.025 + 0.01 * n)
    policy = demand_policy()
    d = policy.decide(busy(need_blocks=90, queue_len=30.0, waiting_blocks=81, step_model=m), PolicyState())
    assert d.reason.startswith("speed:")
    assert CAPACITY[d.target] / 3 <= 13.5 < CAPACITY[d.target + 1] / 3


def test_the_step_model_learns_a_line_and_borrows_a_lower_bucket():
    m = StepTimeModel(30)
    assert m.predict(0, 4) is None
    for n in (1, 2, 3, 4) * 10:
        m.observe(0, n, 0.01 + 0.005 * n)
    assert math.isclose(m.predict(0, 10), 0.06, rel_tol=1e-6)
    assert m.predict(25, 10) == m.predict(0, 10) and not m.known(25)


def ledger_with(tokens_at_level: list[tuple[int, int]]) -> QualityLedger:
    ledger, t = QualityLedger(300.0), 0.0
    for level, n in tokens_at_level:
        for _ in range(n // 100):
            t += 1.0
            ledger.add(t, 100, RATIOS[level])
    return ledger


def test_the_quality_budget_lets_a_short_burst_go_deep_after_calm_full_precision_traffic():
    budget_cfg = CFG.model_copy(update={"max_avg_ppl_increase": 0.05})
    policy = demand_policy(budget_cfg)
    # +5% on the synthetic curve is level 7 if every token paid it; after 6,000 tokens at
    # full precision, the next 3 s of tokens (60/s) may run far deeper
    rested = busy(need_blocks=90, ledger=ledger_with([(0, 6000)]), time=61.0)
    d = policy.decide(rested, PolicyState())
    assert d.target == 30
    # the same burst with no history may only go as deep as the budget itself
    fresh = busy(need_blocks=90, ledger=QualityLedger(300.0))
    assert policy.decide(fresh, PolicyState()).target == 7


def test_a_spent_budget_brings_the_level_down_even_under_load():
    budget_cfg = CFG.model_copy(update={"max_avg_ppl_increase": 0.05})
    policy = demand_policy(budget_cfg)
    spent = ledger_with([(0, 1000), (30, 2000)])
    assert spent.average_increase() > 0.05
    s = busy(need_blocks=90, ledger=spent, time=40.0, quality_increase=spent.average_increase())
    d = policy.decide(s, PolicyState(level=30, last_change=30.0))
    assert d.target < 30 and "quality budget" in d.reason
    assert policy.decide(s, PolicyState(level=30, last_change=39.9)).target == 30  # cooldown still holds


def test_demand_between_the_two_headrooms_holds_the_level():
    policy = demand_policy()
    calm = busy(need_blocks=38, queue_len=0.0, waiting_blocks=0, used_blocks=30)
    d = policy.decide(calm, PolicyState(level=27, last_change=0.0, calm_since=0.0))
    lower = next(k for k, c in enumerate(CAPACITY) if c >= 38 * 1.3)  # 24
    assert d.target == lower  # restores in one plan, only to where the wider headroom holds
    # at 24 layers, demand 41 needs 22 with 10% headroom (no quantizing) and 26 with 30%
    # (no restoring): the level holds
    held = policy.decide(dataclasses.replace(calm, need_blocks=41), PolicyState(level=lower, calm_since=0.0))
    assert held.target == lower


def test_log_ratios_take_the_dearer_neighbour_for_unmeasured_levels():
    sparse = {"orders": {"lis": {"ppl": {"0": 20.0, "10": 22.0, "30": 24.0}}}}
    r = log_ppl_ratios(sparse, 30)
    assert r[0] == 0 and math.isclose(r[5], math.log(1.1)) and math.isclose(r[11], math.log(1.2))
    assert len(log_ppl_ratios(QUALITY, 30)) == 31


def test_the_tracker_teaches_the_step_model_decode_steps_only():
    """A prefill chunk's cost is the prompt's at any level: steps with one are not learned,
    nor is the step that spans a level change."""
    from policies import StepSample, make_tracker

    tracker = make_tracker(CFG, 30)
    t = 0.0
    for i in range(100):
        prefill = i % 4 == 0
        t += 0.5 if prefill else 0.05
        level = 0 if i < 99 else 30
        tracker.add(StepSample(time=t, waiting=0, oldest_wait_s=0.0, running=2 + i % 3, used_blocks=6,
                               capacity_blocks=9, tokens=(500 if prefill else 2 + i % 3), level=level))
    assert math.isclose(tracker.step_model.predict(0, 3), 0.05, rel_tol=1e-6)
    assert not tracker.step_model.known(30)


def test_steps_already_too_slow_hold_the_level():
    """Prefill chunks make the last window's mean step 0.3 s: no level can help TPOT, and
    more admissions would add prefills between every running request's tokens."""
    d = demand_policy().decide(busy(step_time_s=0.3), PolicyState(level=4))
    assert d.target == 4 and "compute-bound, mean step 0.300s" in d.reason


def test_compute_bound_load_moves_to_a_measured_faster_level_within_the_quality_budget():
    """Where the quantized kernel is faster (int8 without AMX), a compute-bound server with
    no capacity shortage goes to a *measured* faster level; where it is slower (or not yet
    measured: a level never served borrows level 0's line) it holds; and the quality cap
    still bounds the choice."""
    slow_now = busy(need_blocks=6, queue_len=0.0, waiting_blocks=0, used_blocks=6, running=6, step_time_s=0.25)
    fast = _model(0.002)  # the top third measured at 20 ms + 2 ms per request, against 6 ms at level 0
    d = demand_policy().decide(dataclasses.replace(slow_now, step_model=fast), PolicyState())
    assert d.target >= 21 and d.reason.startswith("speed:")
    slower = _model(0.012)
    assert demand_policy().decide(dataclasses.replace(slow_now, step_model=slower), PolicyState()).target == 0
    unmeasured = StepTimeModel(30)
    for i in range(60):
        unmeasured.observe(0, 2 + i % 5, 0.02 + 0.006 * (2 + i % 5))
    assert demand_policy().decide(dataclasses.replace(slow_now, step_model=unmeasured), PolicyState()).target == 0
    capped = demand_policy(cap=10).decide(dataclasses.replace(slow_now, step_model=fast), PolicyState())
    assert capped.target <= 10


# A tiered ladder of 60 rungs (30 layers to W8A8, then 30 to W4A16): a W8A8 rung frees two
# blocks at +0.1% perplexity, a W4A16 rung one more block at +1%. The quality curve comes in
# quality.json's tiered shape (`ladder.ppl`), as a tiered pack writes it.
TIERED_CAPACITY = [9 + 2 * min(k, 30) + max(0, k - 30) for k in range(61)]
TIERED_QUALITY = {"orders": {"lis": {"ppl": {"0": 20.0, "30": 26.0}}},
                  "ladder": {"ppl": {str(k): 20.0 * (1.001 ** min(k, 30)) * (1.01 ** max(0, k - 30))
                                     for k in range(61)}}}


def tiered_policy(cfg=CFG):
    return make_policy(cfg, TIERED_CAPACITY, 60, log_ppl_ratios(TIERED_QUALITY, 60))


def test_on_a_tiered_ladder_a_burst_stops_on_the_cheap_w8a8_rungs_when_they_cover_it():
    ratios = log_ppl_ratios(TIERED_QUALITY, 60)
    assert ratios[30] < 0.05 < ratios[60]  # the curve read is the ladder's, not the W4A16 order's
    d = tiered_policy().decide(busy(need_blocks=45), PolicyState())
    need = next(k for k, c in enumerate(TIERED_CAPACITY) if c >= 45 * 1.1)
    assert d.target == need <= 30  # every layer still W8A8 or bf16


def test_on_a_tiered_ladder_a_burst_beyond_w8a8_climbs_into_the_w4a16_rungs():
    d = tiered_policy().decide(busy(need_blocks=75, waiting_blocks=66), PolicyState())
    need = next(k for k, c in enumerate(TIERED_CAPACITY) if c >= 75 * 1.1)
    assert 30 < d.target == need < 60


def test_one_move_up_may_follow_a_paced_move_up_at_once_while_requests_wait():
    """A prompt that arrives just after a move up would otherwise wait out the cooldown in
    the queue (the AVX2 capacity row's one violation); the move after the quick one waits."""
    policy = demand_policy()
    growing = busy(need_blocks=12, queue_len=0.0, waiting_blocks=0, used_blocks=9, time=10.0)
    first = policy.decide(growing, PolicyState())
    assert first.target > 0 and first.state.paced_up
    arrived = dataclasses.replace(growing, need_blocks=30, queue_len=2.0, waiting_blocks=6, time=10.3)
    quick = policy.decide(arrived, first.state)
    assert quick.target > first.target and "requests waiting for blocks" in quick.reason
    assert not quick.state.paced_up and quick.state.last_change == 10.3
    # the same demand with nobody waiting for blocks: the cooldown holds, as before
    unblocked = dataclasses.replace(arrived, queue_len=0.0, waiting_blocks=0)
    assert policy.decide(unblocked, first.state).target == first.target
    # after a quick move, the next one waits out the cooldown again
    more = dataclasses.replace(arrived, need_blocks=45, waiting_blocks=15, time=10.5)
    held = policy.decide(more, quick.state)
    assert held.target == quick.target and "cooldown" in held.reason
    assert policy.decide(dataclasses.replace(more, time=11.3), quick.state).target > quick.target
    # `quick_up: false`: every move waits out the cooldown, as before the exception
    strict = demand_policy(CFG.model_copy(update={"quick_up": False}))
    assert strict.decide(arrived, first.state).target == first.target
    # a restore is never quick: the same boundary with the load gone holds
    gone = dataclasses.replace(growing, need_blocks=3, used_blocks=3, running=1, time=10.3)
    assert policy.decide(gone, first.state).target == first.target


def test_demand_rising_at_every_step_keeps_within_two_transitions_per_cooldown():
    """The worst case for the quick move: blocks awaited and demand higher at every
    boundary. Each transition within cooldown_s of the one before follows a paced one."""
    policy = demand_policy()
    state, times = PolicyState(), []
    for i in range(int(10.0 / DT)):
        t = 10.0 + i * DT
        need = 6 + 2 * i
        s = busy(need_blocks=need, used_blocks=min(need, CAPACITY[state.level]),
                 waiting_blocks=max(0, need - CAPACITY[state.level]), queue_len=1.0, time=t)
        d = policy.decide(s, state)
        if d.target != state.level:
            times.append(t)
        state = d.state
    assert len(times) <= 2 * (math.floor(10.0 / CFG.cooldown_s) + 1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert any(g < CFG.cooldown_s for g in gaps), "the quick move must happen in this sequence"
    for before, gap in zip([math.inf] + gaps, gaps):
        assert gap >= CFG.cooldown_s - 1e-9 or before >= CFG.cooldown_s - 1e-9
