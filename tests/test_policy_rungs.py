"""The demand policy as a chooser of rungs on a tiered ladder (plain Python, milliseconds):
with a kernel profile it knows before serving a level which rung is fast enough, so
moderate load rests on W8A8 where int8 is faster, calm load returns to bf16, and the same
config finds the other answer where int8 is slower at small batches (an AVX2-only EPYC);
the quality budget has a floor instead of a cliff; relief does not flap; and the
controller's view (a restore under way, a decision not carried out) is the policy's."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from policies import PolicyState, Signals, StepSample, make_policy, make_tracker
from policies.base import Decision
from policies.config import PolicyConfig, log_ppl_ratios
from policies.quality_budget import QualityLedger
from policies.step_model import StepTimeModel

L = 30  # layers; the ladder has 2L rungs: every layer to W8A8, then every layer to W4A16
MIX = [{"w8a8": min(k, L) - max(0, k - L), "w4a16": max(0, k - L)} for k in range(2 * L + 1)]
# Plenty of KV at every level (a compute-bound server) and a capacity-bound one.
WIDE = [400 + 4 * k for k in range(2 * L + 1)]
TIGHT = [9 + 2 * min(k, L) + max(0, k - L) for k in range(2 * L + 1)]
QUALITY = {"ladder": {"ppl": {str(k): 20.0 * (1.001 ** min(k, L)) * (1.01 ** max(0, k - L)) for k in range(2 * L + 1)}}}
RATIOS = log_ppl_ratios(QUALITY, 2 * L)
CFG = PolicyConfig(policy="demand", headroom=0.1, restore_headroom=0.3, horizon_s=3.0, cooldown_s=1.0, calm_s=3.0,
                   tpot_slo_s=0.2, slo_margin=0.8, restore_margin=0.5)
BOUND = CFG.tpot_slo_s * CFG.slo_margin

# Seconds of one layer's linears by batch, shaped like the doctor's readings: a Xeon without
# AMX (int8 faster than bf16 at every batch, 4-bit slower) and an AVX2-only EPYC (int8 3x
# slower at batch 1, 2x faster at 32).
AVX512 = {"bf16": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3}, "w8a8": {1: 0.5e-3, 8: 0.8e-3, 32: 1.25e-3},
          "w4a16": {1: 1.5e-3, 8: 2.5e-3, 32: 6.3e-3}}
AVX2 = {"bf16": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3}, "w8a8": {1: 1.9e-3, 8: 1.9e-3, 32: 2.2e-3}}


def true_step(profile: dict, level: int, running: float) -> float:
    """The plant: attention and the rest cost 20 ms + 1 ms per request, linears per the profile."""
    return 0.02 + 0.001 * running + StepTimeModel(2 * L, MIX, profile).tier_part(level, running)


def taught(profile: dict, level: int = 0, batches=(2, 3, 4, 5, 6)) -> StepTimeModel:
    """A model seeded with `profile` that has served decode steps at `level` only."""
    m = StepTimeModel(2 * L, MIX, profile)
    for i in range(60):
        n = batches[i % len(batches)]
        m.observe(level, n, true_step(profile, level, n))
    return m


def load(running: float, profile: dict, level: int = 0, **kw) -> Signals:
    """Running requests with nothing waiting; the measured mean step is the plant's."""
    base = dict(time=100.0, queue_len=0.0, used_blocks=int(running * 3), capacity_blocks=WIDE[level],
                waiting_blocks=0, running=running, need_blocks=int(running * 3), need_per_request=3.0,
                blocks_per_request=3.0, step_time_s=true_step(profile, level, running), remaining_tokens=40,
                arrival_rate=0.0, token_rate=60.0, level=level, step_model=taught(profile, level))
    return Signals(**{**base, **kw})


def policy(capacity=WIDE, cfg=CFG, ratios=None):
    return make_policy(cfg, capacity, 2 * L, ratios)


def test_a_profile_makes_every_level_known_from_level_0_steps_alone():
    with_profile, without = taught(AVX512), StepTimeModel(2 * L, MIX)
    for i in range(60):
        without.observe(0, 2 + i % 5, true_step(AVX512, 0, 2 + i % 5))
    assert all(with_profile.known(k) for k in range(2 * L + 1))
    assert without.known(0) and not any(without.known(k) for k in range(1, 2 * L + 1))
    for k in (0, 10, L, L + 10, 2 * L):
        assert abs(with_profile.predict(k, 24) - true_step(AVX512, k, 24)) < 1e-6


def test_moderate_load_rests_on_w8a8_rungs_where_int8_is_faster_and_calm_load_returns_to_bf16():
    busy = load(30, AVX512)
    assert busy.step_time_s > BOUND  # bf16 cannot serve 30 requests in time here
    p = policy()
    first, _, _ = p.choose(busy, 0, p.demand_blocks(busy), CFG.headroom, 2 * L, BOUND)
    assert 0 < first < L and p.predicted_step(busy, first) <= BOUND < p.predicted_step(busy, first - 1)
    d = policy().decide(busy, PolicyState())
    # every W8A8 rung is faster still: the segment is taken whole, and no W4A16 rung (slower)
    assert d.target == L and d.reason.startswith("speed:") and f"on to level {L}" in d.reason
    # the load falls to 4 requests: after calm_s, back to bf16 in one plan
    calm = load(4, AVX512, level=d.target, time=200.0)
    state = PolicyState(level=d.target, last_change=100.0, calm_since=196.0)
    assert policy().decide(calm, state).target == 0


def test_the_same_config_finds_the_other_answer_where_int8_is_slow_at_small_batches():
    """AVX2-only EPYC: at batch 2 the steps break the bound (a slow machine) and int8 would
    make them slower, so the level holds at bf16; at batch 30 int8 is faster and is taken."""
    slow_small = load(2, AVX2, step_time_s=0.3)
    assert policy().decide(slow_small, PolicyState()).target == 0
    big = load(30, AVX2)
    assert big.step_time_s > BOUND
    d = policy().decide(big, PolicyState())
    assert d.target == L and d.reason.startswith("speed:")


# One AVX2-only EPYC's profile in both engine dtypes (one reading with the timing
# scripts/bench_profile_dtype.py repeats; its medians, within 20% of these, are in
# docs/RESULTS.md): in emulated bf16 int8 beats the full-precision rung from 32 tokens up; in
# fp32 it never does at a decode batch. A server times its profile in its own dtype.
AVX2_BF16 = {"bf16": {1: 0.56e-3, 8: 3.44e-3, 32: 13.0e-3, 256: 98.3e-3},
             "w8a8": {1: 2.96e-3, 8: 6.09e-3, 32: 6.13e-3, 256: 12.3e-3}}
AVX2_FP32 = {"bf16": {1: 0.95e-3, 8: 1.28e-3, 32: 2.39e-3, 256: 13.1e-3},
             "w8a8": {1: 2.68e-3, 8: 5.23e-3, 32: 6.02e-3, 256: 11.5e-3}}


def test_an_fp32_engine_seeded_with_its_own_profile_is_not_sent_to_slower_int8_rungs():
    """An fp32 server on the AVX2 EPYC under a load whose steps break the bound: seeded with
    the fp32 profile nothing is faster than level 0, so it holds; seeded with the bf16 profile
    (what such a server read before it timed its own dtype) the same rule takes every W8A8
    rung for speed, where the engine's true step is slower than at level 0."""

    def signals(seeded: dict) -> Signals:
        m = StepTimeModel(2 * L, MIX, seeded)
        for i in range(60):  # decode steps served at level 0, by the fp32 engine
            n = (2, 3, 4, 5, 6)[i % 5]
            m.observe(0, n, true_step(AVX2_FP32, 0, n))
        return load(60, AVX2_FP32, step_model=m)

    engine = signals(AVX2_FP32)
    assert engine.step_time_s > BOUND  # 60 requests: the steps break the bound at level 0
    held = policy().decide(engine, PolicyState())
    assert held.target == 0, held.reason
    misled = policy().decide(signals(AVX2_BF16), PolicyState())
    assert misled.target == L and misled.reason.startswith("speed:")
    assert true_step(AVX2_FP32, L, 60) > true_step(AVX2_FP32, 0, 60)  # the move would have slowed every step


def test_a_move_up_goes_on_only_through_rungs_measured_faster():
    """Past the first level that meets the tests, a move goes on only while rungs compute
    the batch faster, by FURTHER_GAIN in all: not into slower 4-bit rungs, not on a tier as
    fast as bf16 within noise, and not without a step model."""
    from policies.demand import FURTHER_GAIN

    need = next(k for k, c in enumerate(TIGHT) if c >= 40 * 1.1)
    queue = dict(capacity_blocks=TIGHT[0], need_blocks=40, waiting_blocks=31, queue_len=10.0, used_blocks=9)
    assert policy(TIGHT).decide(load(3, AVX512, **queue), PolicyState()).target == L  # W8A8 faster: whole
    same = {"bf16": AVX512["bf16"], "w8a8": {b: t * (1 - FURTHER_GAIN / 2) for b, t in AVX512["bf16"].items()},
            "w4a16": AVX512["w4a16"]}
    assert policy(TIGHT).decide(load(3, same, **queue), PolicyState()).target == need
    slow_w8 = {**AVX512, "w8a8": {b: 2 * t for b, t in AVX512["bf16"].items()}}
    assert policy(TIGHT).decide(load(3, slow_w8, **queue), PolicyState()).target == need
    assert policy(TIGHT).decide(load(3, AVX512, step_model=None, **queue), PolicyState()).target == need


def test_a_burst_beyond_the_w8a8_rungs_capacity_climbs_into_w4a16_rungs_as_far_as_speed_allows():
    need = next(k for k, c in enumerate(TIGHT) if c >= 80 * 1.1)
    cheap_w4 = {**AVX512, "w4a16": AVX512["w8a8"]}
    for profile in (cheap_w4, AVX512):
        s = load(3, profile, capacity_blocks=TIGHT[0], need_blocks=80, waiting_blocks=71, queue_len=24.0,
                 used_blocks=9)
        d = policy(TIGHT).decide(s, PolicyState())
        if profile is cheap_w4:  # 4-bit as fast as int8: the level the demand needs
            assert L < need == d.target and d.reason.startswith("capacity:")
        else:  # 4-bit slower: the most capacity whose predicted step still meets the bound
            assert L < d.target < need and d.reason.startswith("speed:")
            assert policy(TIGHT).predicted_step(s, d.target) <= BOUND < policy(TIGHT).predicted_step(s, need)


def test_relief_does_not_flap():
    """Closed loop at a steady 30 requests: the old rule moved up for speed, then the calm
    branch restored because the step was now under the bound, and so on. Here a restore is
    judged by the step predicted at the level it goes to."""
    p, state, changes = policy(), PolicyState(), []
    for i in range(400):  # 20 s of 50 ms boundaries
        t = i * 0.05
        s = load(30, AVX512, level=state.level, time=t)
        d = p.decide(s, state)
        if d.target != state.level:
            changes.append((t, state.level, d.target))
        state = d.state
    assert len(changes) == 1 and changes[0][1] == 0 and 0 < changes[0][2] <= L


def ledger_over_budget() -> QualityLedger:
    ledger = QualityLedger(300.0)
    for t in range(40):
        ledger.add(float(t), 100, RATIOS[2 * L])  # all-W4A16 tokens: +35%
    return ledger


def test_a_spent_budget_comes_down_to_the_highest_level_it_allows_not_to_bf16():
    budget = CFG.model_copy(update={"max_avg_ppl_increase": 0.05})
    p = policy(TIGHT, budget, RATIOS)
    ledger = ledger_over_budget()
    s = load(3, AVX512, capacity_blocks=TIGHT[2 * L], need_blocks=80, waiting_blocks=0, queue_len=0.0,
             used_blocks=80, ledger=ledger, time=41.0, quality_increase=ledger.average_increase())
    assert ledger.average_increase() > 0.05
    floor = max(k for k in range(2 * L + 1) if RATIOS[k] <= 0.0488)  # log1p(0.05)
    assert floor >= L  # all-W8A8 costs +3%, within the budget on its own
    assert p.quality_limit(s) == floor
    d = p.decide(s, PolicyState(level=2 * L, last_change=30.0))
    assert d.target == floor and d.reason.startswith("quality budget")


def test_only_tokens_served_under_the_policy_are_charged():
    tracker = make_tracker(CFG.model_copy(update={"max_avg_ppl_increase": 0.05}), 2 * L, RATIOS)
    for i in range(10):  # a warm-up at forced levels
        tracker.add(StepSample(time=i * 0.1, waiting=0, oldest_wait_s=0.0, running=2, used_blocks=6,
                               capacity_blocks=9, tokens=50, served_tokens=50, level=2 * L), charge=False)
    assert tracker.ledger.tokens == 0
    s = tracker.add(StepSample(time=1.1, waiting=0, oldest_wait_s=0.0, running=2, used_blocks=6, capacity_blocks=9,
                               tokens=300, served_tokens=120, level=L))
    assert s.quality_tokens == 120  # served tokens (as the evaluation counts them), not computed ones
    assert abs(s.quality_increase - (QUALITY["ladder"]["ppl"][str(L)] / 20.0 - 1)) < 1e-9


# -- the controller's side: one state ----------------------------------------------------

class ScriptedPolicy:
    """Answers each decide() with the next target; records the levels it was asked from."""

    def __init__(self, targets):
        self.targets, self.asked = list(targets), []
        self.max_level = 2 * L

    def admission(self, signals, level):
        return None  # no admission cap, as PolicyBase

    def token_budget(self, signals, level):
        return None  # vLLM's own step budget, as PolicyBase

    def moves_while_idle(self):
        return False  # as PolicyBase

    def decide(self, signals, state):
        self.asked.append(state.level)
        target = self.targets.pop(0)
        if target == state.level:
            return Decision(target, "hold", state)
        return Decision(target, "scripted", PolicyState(target, signals.time, None))


def _controller(level: int, targets, compress_mode: str = "sync"):
    from morphserve.runtime.controller import MorphController
    from morphserve.runtime.policy_loop import PolicyLoop
    from tests.test_transition_plans import LADDER, _moves

    moves, worker, pool = _moves(level)
    c = object.__new__(MorphController)
    c.moves, c.pool, c.forced_level, c.errors = moves, pool, None, 0
    c.admission_cap, c.admission_changes, c.token_budget = None, 0, None
    c.config = SimpleNamespace(restore_mode="background", compress_mode=compress_mode)
    c.recorder = moves.recorder
    sample = StepSample(time=5.0, waiting=0, oldest_wait_s=0.0, running=1, used_blocks=1, capacity_blocks=10)
    c.scheduler = SimpleNamespace(sample=lambda *a: sample)
    c.loop = moves.policy = PolicyLoop(None)
    c.loop.policy, c.loop.tracker = ScriptedPolicy(targets), make_tracker(CFG, LADDER.top)
    return c, worker


def test_a_restore_under_way_is_retargeted_and_the_policy_reasons_from_its_target():
    from tests.test_transition_plans import LADDER

    c, worker = _controller(LADDER.top, [0, 0, 3, 1])
    c._decide()  # top -> 0 starts in the background
    assert c.moves.restoring["level"] == 0
    c._decide()  # asked from 0 (where the pool already is), holds: nothing changes
    assert c.loop.policy.asked == [LADDER.top, 0] and c.moves.restoring["level"] == 0
    c._decide()  # up: the restore is cut short at 3
    assert c.moves.restoring is not None and c.moves.restoring["level"] == 3
    c._decide()  # down again, deeper than 3
    assert c.moves.restoring["level"] == 1 and c.forced_level is None and c.errors == 0


def test_a_part_way_restore_is_not_called_off_by_the_boundaries_that_wait_for_the_rest():
    """A restore to 0 with block 18 in use goes part-way to 2 in the background and keeps 0
    pending. The policy is asked from 0 (where the controller is heading), so its holds do
    not retarget; the pending retry waits for the part-way restore, then shrinks the pool
    to 0's blocks again; the rest follows once block 18 frees."""
    from tests.test_transition_plans import LADDER, _hold, capacity

    c, worker = _controller(LADDER.top, [0] * 30)
    for name in ("keep_tail_cold", "refresh_memory_if_due", "trim_heap_if_due"):
        setattr(c, name, lambda *args, **kwargs: None)
    c.heap_trims = c.own_trims = SimpleNamespace(stepped=lambda: None)
    held = _hold(c.pool, {18}, 18)
    c._decide()
    assert c.moves.restoring["level"] == 2 and c.moves.pending_level == 0
    c._step_boundary(True)  # one layer installed; asked from 0, the policy holds
    assert c.loop.policy.asked[-1] == 0 and c.moves.restoring is not None and c.moves.pending_level == 0
    while c.moves.restoring is not None:
        c._step_boundary(True)
    assert c.moves.level == 2 and c.moves.pending_level == 0
    assert c.pool.limit == capacity(0) and c.errors == 0  # block 18 still in use: the rest waits
    c.pool.store.vllm_pool.free_blocks([held[18]])
    for _ in range(4):
        c._step_boundary(True)
    assert c.moves.level == 0 and c.moves.pending_level is None and c.errors == 0
    assert worker.tiers == {} and c.pool.committed == capacity(0)


def test_a_compression_goes_to_the_background_only_while_requests_decode():
    """compress_mode background: with a request decoding the move is prepared in a thread
    (a synchronous one would stall its tokens); with none, it is made at once."""
    from tests.test_transition_plans import LADDER

    c, worker = _controller(0, [LADDER.top], compress_mode="background")
    c._decide()  # the sample has one request running
    assert c.moves.restoring is not None and c.moves.restoring["direction"] == "quantize"
    assert c.moves.level == 0 and "morphserve_apply" not in worker.calls

    c, worker = _controller(0, [LADDER.top], compress_mode="background")
    idle = StepSample(time=5.0, waiting=1, oldest_wait_s=0.0, running=0, used_blocks=0, capacity_blocks=10)
    c.scheduler = SimpleNamespace(sample=lambda *a: idle)
    c._decide()
    assert c.moves.restoring is None and c.moves.level == LADDER.top

    c, worker = _controller(0, [LADDER.top])  # sync: at once, whatever is running
    c._decide()
    assert c.moves.restoring is None and c.moves.level == LADDER.top


def test_a_compression_is_made_at_once_when_this_boundary_has_nothing_decoding():
    """The signals average a window of boundaries; whether requests decode *now* is this
    boundary's own reading (a burst of prompts after a request finished is computed on the
    new rung, not prepared in the background while it prefills in bf16)."""
    from tests.test_transition_plans import LADDER

    c, worker = _controller(0, [0, LADDER.top], compress_mode="background")
    c._decide()  # one request decoding: holds at 0
    idle = StepSample(time=5.1, waiting=3, oldest_wait_s=0.0, running=0, used_blocks=0, capacity_blocks=10)
    c.scheduler = SimpleNamespace(sample=lambda *a: idle)
    c._decide()
    assert c.loop.signals.running > 0  # the window still remembers the request
    assert c.moves.restoring is None and c.moves.level == LADDER.top


def test_a_restore_from_4bit_rungs_stops_at_the_top_of_the_faster_w8a8_run():
    """30 requests, int8 faster than bf16: calm at L + 10 restores to all-W8A8 (a level
    inside the W8A8 run would be climbed again at the next move up); calm at L holds."""
    above = load(30, AVX512, level=L + 10, time=200.0)
    d = policy().decide(above, PolicyState(level=L + 10, last_change=100.0, calm_since=196.0))
    assert d.target == L and "top of the run" in d.reason
    at_top = load(30, AVX512, level=L, time=200.0)
    d = policy().decide(at_top, PolicyState(level=L, last_change=100.0, calm_since=196.0))
    assert d.target == L and "inside a run of faster rungs" in d.reason


def test_a_decision_that_was_not_carried_out_changes_nothing():
    c, worker = _controller(0, [4])

    def broken(method, *args):
        raise RuntimeError("worker gone")

    c.moves.rpc = broken
    before = c.loop.state
    try:
        c._decide()
    except Exception:
        pass
    assert c.loop.state == before  # no cooldown started by a transition that never happened
    assert dataclasses.replace(before).last_change == float("-inf")


def test_the_default_budget_is_no_worse_than_static_w8a8_where_the_pack_has_it():
    from policies.config import load_policy, resolve_budget

    default, _ = load_policy("default")
    assert default.quality_no_worse_than == "w8a8"
    tiered = resolve_budget(default, QUALITY, MIX)
    static_w8a8 = QUALITY["ladder"]["ppl"][str(L)] / 20.0 - 1  # +3.0% on this synthetic curve
    assert tiered.max_avg_ppl_increase == pytest.approx(static_w8a8)
    w4_only = [{"w4a16": k} if k else {} for k in range(L + 1)]
    assert resolve_budget(default, QUALITY, w4_only).max_avg_ppl_increase == 0.05
    generous = default.model_copy(update={"max_avg_ppl_increase": 0.01})
    assert resolve_budget(generous, QUALITY, MIX).max_avg_ppl_increase == 0.01  # the tighter of the two


def test_an_fp8_cache_measured_cost_is_charged_as_the_evaluation_charges_it():
    """With the KV cache's factors in the served quality (the engine adds them where
    `morphserve pack kv-cost` measured them), the ledger's figure over a run equals the
    evaluation's charged figure for the same tokens, and the W8A8 reference is static W8A8
    served with the same cache."""
    from morphserve.evaluation import kv_quality
    from morphserve.offline import kv_cost
    from policies.config import load_policy, resolve_budget

    factors = kv_cost.factors_by_level({0: 1.026, 15: 1.032, 30: 1.020, 45: 1.029, 60: 1.036}, 2 * L)
    charged_quality = {**QUALITY, "kv_cost": {"dtype": "fp8",
                                              "factor_by_level": {str(k): f for k, f in factors.items()}}}
    ratios = log_ppl_ratios(charged_quality, 2 * L)
    assert ratios[0] == pytest.approx(math.log(1.026))  # bf16 weights already pay for the cache
    assert ratios[L] == pytest.approx(RATIOS[L] + math.log(1.020))
    default, _ = load_policy("default")
    uncapped = default.model_copy(update={"max_avg_ppl_increase": None})
    budget = resolve_budget(uncapped, charged_quality, MIX).max_avg_ppl_increase
    assert budget == pytest.approx(QUALITY["ladder"]["ppl"][str(L)] / 20.0 * 1.020 - 1)  # static W8A8 + FP8: +5.1%
    assert resolve_budget(default, charged_quality, MIX).max_avg_ppl_increase == 0.05  # the preset's own cap
    # one run's tokens, by level, as the evaluation counts them: the ledger agrees to 1e-9
    tokens = {"prompt": {"0": 900, "30": 2400}, "output": {"0": 60, "30": 300, "37": 40, "60": 5}}
    ledger = QualityLedger(window_s=1e9)
    for part in tokens.values():
        for k, n in part.items():
            ledger.add(0.0, n, ratios[int(k)])
    curve = {int(k): float(v) for k, v in QUALITY["ladder"]["ppl"].items()}
    both = {}
    for part in tokens.values():
        for k, n in part.items():
            both[int(k)] = both.get(int(k), 0) + n
    weights_only = math.exp(sum(n * math.log(curve[k]) for k, n in both.items()) / sum(both.values()))
    record = {"ppl": weights_only, "ppl_increase": weights_only / curve[0] - 1, "ppl_output_tokens": None,
              "tokens_by_level": tokens}
    assert ledger.average_increase() == pytest.approx(kv_quality.charged(record, factors)["ppl_increase"], abs=1e-9)


def test_an_idle_spell_is_not_a_slow_step():
    tracker = make_tracker(CFG, 2 * L)
    t = 0.0
    for i in range(10):
        t += 0.05  # the last step finishes both requests: nothing runs after it
        s = tracker.add(StepSample(time=t, waiting=0, oldest_wait_s=0.0, running=2 if i < 9 else 0, used_blocks=6,
                                   capacity_blocks=9, tokens=2))
    t += 1.5  # idle (no boundaries), then a request arrives and is prefilled
    s = tracker.add(StepSample(time=t, waiting=0, oldest_wait_s=0.0, running=1, used_blocks=3, capacity_blocks=9,
                               tokens=400))
    assert s.step_time_s == pytest.approx(0.05)


def test_the_budget_floor_judges_a_level_by_its_own_cost():
    """A measured curve need not rise at every rung (level 28 reads dearer than all-W8A8
    here): a jump to 30 is one plan, so 30 is within a budget equal to its own cost."""
    ratios = list(RATIOS)
    ratios[28] = ratios[L] * 1.05
    budget = CFG.model_copy(update={"max_avg_ppl_increase": QUALITY["ladder"]["ppl"][str(L)] / 20.0 - 1})
    p = policy(TIGHT, budget, ratios)
    s = load(3, AVX512, ledger=ledger_over_budget(), time=41.0)
    assert p.quality_limit(s) == L


def test_steps_longer_than_the_window_are_still_seen():
    """Prefills of long prompts on 2 cores take over a second each, more than window_s."""
    tracker = make_tracker(CFG.model_copy(update={"window_s": 1.0}), 2 * L)
    t, s = 0.0, None
    for i in range(6):
        t += 1.3
        s = tracker.add(StepSample(time=t, waiting=3, oldest_wait_s=t, running=4, used_blocks=12, capacity_blocks=19,
                                   tokens=512))
    assert s.step_time_s == pytest.approx(1.3) and s.step_time_s > BOUND


def test_levels_are_compared_on_one_base_whatever_load_taught_it():
    """Steps learned in a small warm-up at bf16 and under a burst at all-W8A8: a rung with
    a 4-bit layer added must still predict slower than all-W8A8 where 4-bit is slower."""
    m = StepTimeModel(2 * L, MIX, AVX512)
    for i in range(30):
        m.observe(0, 4, true_step(AVX512, 0, 4) * 0.8)  # a quieter moment
        m.observe(L, 16, true_step(AVX512, L, 16) * 1.2)  # a busier one
    assert m.predict(L + 1, 16) > m.predict(L, 16) < m.predict(L - 1, 16)


# -- prompts: a long prompt is computed on a rung fast enough for its first token ------------
PROMPT_TOKEN_S = 1.0e-3  # the plant's cost of a prompt token outside the linears


def prefill_step(profile: dict, level: int, running: int, prompt_tokens: int) -> float:
    """The plant's prefill step: the decode part, the level's linears per prompt token at
    their large-batch slope, and the shared cost per prompt token."""
    m = StepTimeModel(2 * L, MIX, profile)
    return true_step(profile, level, running) + prompt_tokens * (PROMPT_TOKEN_S + m._slopes[level])


def test_the_step_model_learns_the_shared_cost_of_a_prompt_token_and_predicts_every_level():
    m = taught(AVX512)
    # before any prefill step: the prior, a prompt token's shared cost = bf16's linears'
    assert not m.prompt_learned and m.prefill_seconds(0, 1000) == pytest.approx(1000 * 2 * m._slopes[0])
    assert StepTimeModel(2 * L, MIX).prefill_seconds(0, 1000) is None  # no profile: unknown
    for _ in range(5):
        m.observe_prefill(0, 3, 800, prefill_step(AVX512, 0, 3, 800))
    assert m.prompt_learned and m.prompt_token_s == pytest.approx(PROMPT_TOKEN_S, rel=1e-6)
    for k in (0, L, 2 * L):  # levels never served are predicted from the profile
        assert m.prefill_seconds(k, 1000) == pytest.approx(prefill_step(AVX512, k, 0, 1000) - true_step(AVX512, k, 0))
    # int8's marginal cost per token is below bf16's: all-W8A8 prefills faster
    assert m.prefill_seconds(L, 1000) < m.prefill_seconds(0, 1000)


def prompt_waiting(tokens: int, level: int = 0, **kw) -> Signals:
    """Three short requests decoding and one prompt of `tokens` waiting, just arrived."""
    s = load(3, AVX512, level=level, **kw)
    s.step_model.observe_prefill(level, 3, 800, prefill_step(AVX512, level, 3, 800))
    return dataclasses.replace(s, pending_prompt_tokens=tokens, queue_len=1.0, waiting_blocks=8)


def test_a_long_prompt_moves_to_the_first_rung_that_gives_its_first_token_in_time():
    p = policy()
    bound = CFG.ttft_slo_s * CFG.slo_margin
    short, long_ = prompt_waiting(100), prompt_waiting(1000)
    assert p.decide(short, PolicyState()).target == 0  # bf16 serves a short prompt in time
    assert p.prompt_seconds(long_, 0) > bound  # but not a 1,000-token one here
    d = p.decide(long_, PolicyState())
    assert 0 < d.target <= L and d.reason.startswith("speed:") and "prompt tokens" in d.reason
    assert p.prompt_seconds(long_, d.target) <= bound < p.prompt_seconds(long_, d.target - 1)


def test_more_prompt_than_any_rung_computes_in_time_takes_the_fastest_prefill():
    d = policy().decide(prompt_waiting(20_000), PolicyState())
    p = policy()
    s = prompt_waiting(20_000)
    fastest = min(range(2 * L + 1), key=lambda k: p.prompt_seconds(s, k))
    assert d.target == fastest == L and "no level computes them" in d.reason  # all-W8A8, not a 4-bit rung


def test_hopeless_prompts_do_not_trade_away_the_capacity_the_demand_needs():
    """A burst of prompts no level prefills in time, on a ladder where only the 4-bit rungs
    hold the demand: the prompt time picks among the levels that hold it, it does not
    pull the server back to a faster rung that cannot admit the burst."""
    s = dataclasses.replace(prompt_waiting(20_000), need_blocks=160, waiting_need_blocks=150, waiting_blocks=150)
    p = policy(capacity=TIGHT)
    assert [k for k in range(2 * L + 1) if TIGHT[k] >= 160 * 1.1] == []  # nothing holds it: the capacity rule
    d = p.decide(s, PolicyState())
    assert d.target > L, d.reason  # into the W4A16 rungs for capacity, as before the prompt test
    wide = policy().decide(prompt_waiting(20_000), PolicyState())
    assert wide.target == L  # where every level holds it, the fastest prefill


def test_hopeless_prompts_weigh_the_decode_a_rung_would_cost_not_the_prefill_alone():
    """An fp32 engine on the AVX2 EPYC, a prompt no level prefills in time: int8 prefills a
    token faster there but decodes ~3x slower. With output still to come (three requests
    decoding, the waiting one's own output), the rung that prefills fastest would finish the
    work later, so the level holds; with no output expected it is the prefill alone, as
    before. Where int8 is faster at both (the AVX-512 Xeon) all-W8A8 is taken either way."""
    def fp32_waiting(outputs: int) -> Signals:
        s = load(3, AVX2_FP32)
        s.step_model.observe_prefill(0, 3, 800, prefill_step(AVX2_FP32, 0, 3, 800))
        return dataclasses.replace(s, pending_prompt_tokens=3000, queue_len=1.0, waiting_blocks=8,
                                   pending_output_tokens=outputs)

    p = policy()
    busy = fp32_waiting(4 * 100)
    assert p.prompt_seconds(busy, L) < p.prompt_seconds(busy, 0) and not any(
        p.prompt_seconds(busy, k) <= CFG.ttft_slo_s * CFG.slo_margin for k in range(2 * L + 1))
    held = p.decide(busy, PolicyState())
    assert held.target == 0 and "400 output tokens soonest" in held.reason, held.reason
    # the plant agrees: 3,000 prompt tokens then 100 decode steps at batch 4
    def finish(level: int) -> float:
        return prefill_step(AVX2_FP32, level, 3, 3000) + 100 * true_step(AVX2_FP32, level, 4)
    assert finish(0) < finish(L)
    prompt_only = p.decide(fp32_waiting(0), PolicyState())
    assert prompt_only.target == min(range(2 * L + 1), key=lambda k: p.prompt_seconds(busy, k)) > 0
    both_faster = dataclasses.replace(prompt_waiting(20_000), pending_output_tokens=400)
    assert p.decide(both_faster, PolicyState()).target == L


def test_a_hopeless_prompt_does_not_move_for_a_gain_within_the_profiles_noise():
    """Two rungs a hair apart for the work in the system: the level stays where it is, no
    quality spent on a difference the kernel profile cannot tell from noise."""
    nearly = {"bf16": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3, 256: 40e-3},
              "w8a8": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3, 256: 39.5e-3}}
    s = load(3, nearly)
    s.step_model.observe_prefill(0, 3, 800, prefill_step(nearly, 0, 3, 800))
    s = dataclasses.replace(s, pending_prompt_tokens=20_000, queue_len=1.0, waiting_blocks=8, pending_output_tokens=0)
    p = policy()
    assert p.prompt_seconds(s, L) < p.prompt_seconds(s, 0)  # all-W8A8 is the fastest prefill, by under 1%
    d = p.decide(s, PolicyState())
    assert d.target == 0, d.reason


def test_a_move_for_a_prompt_counts_the_move_itself():
    """An fp32 engine on the AVX2 EPYC, one prompt that level 0 prefills 2% over the bound and
    a few W8A8 layers bring just under it. Before any transition is timed the move is made
    (as before); once the engine has waited 0.45 s for 13 layers (the warm-up's moves teach
    it), the move's own time puts every other level over the bound too, and the work in the
    system is done soonest where it is: the level holds."""
    def waiting(moves: dict | None) -> Signals:
        s = load(3, AVX2_FP32)
        s.step_model.observe_prefill(0, 3, 800, prefill_step(AVX2_FP32, 0, 3, 800))
        for direction, (layers, seconds) in (moves or {}).items():
            s.step_model.observe_move(direction, layers, seconds)
        bound = CFG.ttft_slo_s * CFG.slo_margin
        tokens = round(1.02 * bound / s.step_model.prefill_seconds(0, 1.0))
        return dataclasses.replace(s, pending_prompt_tokens=tokens, queue_len=1.0, waiting_blocks=8,
                                   pending_output_tokens=4 * 50)

    p = policy()
    untimed = p.decide(waiting(None), PolicyState())
    assert 0 < untimed.target < 10 and "prompt tokens in" in untimed.reason, untimed.reason
    timed = waiting({"up": (13, 0.45)})
    assert timed.step_model.move_seconds(0, untimed.target) == pytest.approx(untimed.target * 0.45 / 13)
    held = p.decide(timed, PolicyState())
    assert held.target == 0, held.reason
    # without the move's time that level would still have met the bound
    assert p.prompt_seconds(timed, untimed.target) <= CFG.ttft_slo_s * CFG.slo_margin
    assert p.prompt_seconds(timed, untimed.target, current=0) > CFG.ttft_slo_s * CFG.slo_margin


def test_the_step_model_learns_what_a_move_costs_by_direction():
    m = StepTimeModel(2 * L, MIX, AVX2_FP32)
    assert m.move_seconds(0, 13) is None and m.move_seconds(5, 5) == 0.0  # nothing timed yet; no move
    m.observe_move("up", 30, 0.95)
    assert m.move_seconds(0, 10) == pytest.approx(10 * 0.95 / 30)
    assert m.move_seconds(10, 0) == pytest.approx(10 * 0.95 / 30)  # a restore borrows the other direction
    m.observe_move("down", 30, 0.64)
    assert m.move_seconds(30, 0) == pytest.approx(0.64)
    m.observe_move("up", 13, 0.45)  # an exponential average over a few transitions
    assert 0.95 / 30 < m.move_seconds(0, 1) < 0.45 / 13
    m.observe_move("sideways", 3, 1.0)
    m.observe_move("up", 0, 1.0)
    assert set(m.move_layer_s) == {"up", "down"} and "move_s_per_layer" in m.as_dict()


def test_a_slower_rung_is_not_held_for_a_speed_it_does_not_give():
    """Held at level 13 on the AVX2 EPYC in fp32 (taken for a prompt), 30 requests decoding
    and calm: level 0's step (0.119 s) misses the restore margin (0.1 s), but level 13's is
    slower still (0.166 s). The old rule held 13 for lack of a level meeting the margin; the
    restore now goes to level 0. Where the level served is the fastest (all-W8A8 on the
    AVX-512 Xeon) the same state holds, as relief must not be undone."""
    state = PolicyState(level=13, last_change=100.0, calm_since=196.0)
    calm = load(30, AVX2_FP32, level=13, time=200.0)
    restore_bound = CFG.tpot_slo_s * CFG.restore_margin
    p = policy()
    assert p.predicted_step(calm, 0, projected=False) > restore_bound
    assert true_step(AVX2_FP32, 13, 30) > true_step(AVX2_FP32, 0, 30)
    d = p.decide(calm, state)
    assert d.target == 0 and "no level meets the restore margins" in d.reason, d.reason
    # with requests running it does not wait for calm (level 0 computes a request faster and
    # holds the demand: a move down for speed), but it waits out the cooldown
    early = p.decide(calm, PolicyState(level=13, last_change=100.0, calm_since=None))
    assert early.target == 0 and "under load" in early.reason, early.reason
    assert p.decide(calm, PolicyState(level=13, last_change=199.5, calm_since=None)).target == 13
    # idle, a restore still waits for calm
    idle = dataclasses.replace(calm, running=0, used_blocks=0, need_blocks=0)
    assert p.decide(idle, PolicyState(level=13, last_change=100.0, calm_since=None)).target == 13
    relieved = load(50, AVX512, level=L, time=200.0)
    assert p.predicted_step(relieved, L, projected=False) > restore_bound
    assert p.decide(relieved, PolicyState(level=L, last_change=100.0, calm_since=196.0)).target == L


def test_prompts_do_not_stop_a_restore_once_computed_but_do_while_waiting():
    state = PolicyState(level=L, last_change=100.0, calm_since=196.0)
    calm = prompt_waiting(0, level=L, time=200.0)
    calm = dataclasses.replace(calm, queue_len=0.0, waiting_blocks=0)
    assert policy().decide(calm, state).target == 0
    waiting = prompt_waiting(1000, level=L, time=200.0)
    assert policy().decide(waiting, state).target == L


def test_an_arrival_boundary_is_not_a_step():
    """The boundary taken when requests arrive, before they are scheduled, comes a
    millisecond after the last step's: that gap must not read as a (fast) step, and a
    prefill step's time must not teach the decode fit."""
    tracker = make_tracker(CFG, 2 * L, mix=MIX, profile=AVX512)
    t = 0.0
    for i in range(8):  # decode steps of 100 ms at batch 4
        t += 0.1
        tracker.add(StepSample(time=t, waiting=0, oldest_wait_s=0, running=4, used_blocks=10, capacity_blocks=50,
                               tokens=4))
    weight = tracker.step_model._fits[-1].w
    s = tracker.add(StepSample(time=t + 0.001, waiting=1, oldest_wait_s=0.0, running=4, used_blocks=10,
                               capacity_blocks=50, arrivals=1, pending_prompt_tokens=900, stepped=False))
    assert s.p95_tpot_s == pytest.approx(0.1) and s.step_time_s == pytest.approx(0.1)
    assert s.queue_len == 0  # the request the next step admits is not a queue (it would hold a restore's calm)
    assert s.pending_prompt_tokens == 900 and tracker.step_model._fits[-1].w == weight
    s = tracker.add(StepSample(time=t + 5.0, waiting=0, oldest_wait_s=0, running=5, used_blocks=18,
                               capacity_blocks=50, tokens=904, prefill_tokens=900))
    assert tracker.step_model._fits[-1].w == weight  # a prefill step teaches the prompt cost, not the decode fit
    expected = (5.0 - 0.001 - tracker.step_model.predict(0, 5)) / 900 - tracker.step_model._slopes[0]
    assert tracker.step_model.prompt_token_s == pytest.approx(expected) and expected > 0


REST = CFG.model_copy(update={"fast_rest_idle_s": 10.0})


def test_light_load_rests_on_the_faster_w8a8_run_while_requests_come_and_idle_returns_to_bf16():
    """Two requests, bf16 fast enough: without fast_rest_idle_s the level stays bf16; with it,
    where int8 computes the batch faster, the W8A8 run is taken whole and held while
    requests come; bf16 again only after fast_rest_idle_s without a request (then calm_s)."""
    light = load(2, AVX512)
    assert policy().decide(light, PolicyState()).target == 0
    d = policy(cfg=REST).decide(light, PolicyState())
    assert d.target == L and d.reason.startswith("speed:") and "resting there" in d.reason
    assert d.state.busy_at == light.time
    # still busy, later: hold at the top of the run (not a restore, not further into W4A16)
    held = policy(cfg=REST).decide(load(2, AVX512, level=L, time=150.0),
                                   PolicyState(level=L, last_change=100.0, calm_since=140.0))
    assert held.target == L and held.reason.startswith("hold:")
    # the requests have finished: 5 s idle holds, 12 s idle (plus calm) restores to bf16
    idle = dict(used_blocks=0, need_blocks=0, step_time_s=0.0)
    last_request = 150.0
    for at, expected in ((155.0, L), (162.0, 0)):
        s = load(0, AVX512, level=L, time=at, **idle)
        state = PolicyState(level=L, last_change=100.0, calm_since=at - 4.0, busy_at=last_request)
        d = policy(cfg=REST).decide(s, state)
        assert d.target == expected, d.reason
        assert d.state.busy_at == last_request  # an idle boundary does not move it


SLACK = REST.model_copy(update={"further_slack": 0.05})


def test_further_slack_leaves_the_last_layers_in_full_precision_for_at_most_that_much_speed():
    """Resting fast where every W8A8 rung is faster: with further_slack 0.05 the climb stops
    at the lowest rung within 5% of the run's top on both terms (the rung below it is not),
    short of the top and above the first sufficient rung; held there while requests come;
    and from the top, once calm, the server comes down to it. 0 keeps the top."""
    light = load(2, AVX512)
    p = policy(cfg=SLACK)
    d = p.decide(light, PolicyState())
    assert 0 < d.target < L and "within 5% of level 30's speed (further_slack)" in d.reason, d.reason
    batch = max(1.0, float(light.running))
    top, here, below = (p._costs(light, k, batch) for k in (L, d.target, d.target - 1))
    assert all(h <= t * 1.05 for h, t in zip(here, top))
    assert any(b > t * 1.05 for b, t in zip(below, top))
    held = p.decide(load(2, AVX512, level=d.target, time=150.0),
                    PolicyState(level=d.target, last_change=100.0, calm_since=140.0))
    assert held.target == d.target and held.reason.startswith("hold:"), held.reason
    down = p.decide(load(2, AVX512, level=L, time=150.0), PolicyState(level=L, last_change=100.0, calm_since=140.0))
    assert down.target == d.target and "within further_slack of the top" in down.reason, down.reason
    # calm and past fast_rest_idle_s' reach for the rest branch: a climb capped at the level
    # served measures the slack against the run's own top, so it finds that level again
    assert p.further(light, 0, d.target, batch)[0] == d.target
    assert policy(cfg=REST).decide(light, PolicyState()).target == L
    assert policy(cfg=SLACK.model_copy(update={"further_slack": 0.0})).decide(light, PolicyState()).target == L


def test_the_default_preset_rests_within_its_slack_of_the_fast_run_and_takes_the_top_where_it_must():
    """`default` carries further_slack 0.05 (chosen by a development run written down before it
    ran, docs/POLICIES.md): where int8 wins at every batch, light load rests below the top of
    the W8A8 run, within 5% of its speed, with some layers still in bf16; where every level is
    compute-bound the slack has nothing to give and the top is served as before."""
    from policies.config import load_policy

    default, _ = load_policy("default")
    assert default.further_slack == 0.05 and default.fast_rest_idle_s == 10
    light = load(2, AVX512)
    d = policy(cfg=default).decide(light, PolicyState())
    assert 0 < d.target < L and "(further_slack)" in d.reason, d.reason
    slow = load(30, AVX512, step_time_s=1.0)  # every level breaks the TPOT bound
    assert policy(cfg=default).decide(slow, PolicyState()).target == L


def test_resting_fast_follows_the_measurement_where_int8_is_slow_at_small_batches():
    """AVX2-only EPYC: one request decodes faster in bf16, so it stays at bf16; at 30 the
    W8A8 run is faster at both terms and is where the load rests."""
    assert policy(cfg=REST).decide(load(1, AVX2), PolicyState()).target == 0
    busy = policy(cfg=REST).decide(load(30, AVX2), PolicyState())
    assert busy.target == L


def test_a_rung_faster_only_for_prompts_is_taken_for_them():
    """Decode as fast as bf16 within noise, but a prompt token much cheaper (int8's gain at
    prefill-sized batches): the run is taken, and the reason says why."""
    prompt_fast = {"bf16": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3, 256: 40e-3},
                   "w8a8": {1: 0.6e-3, 8: 1.6e-3, 32: 4.6e-3, 256: 20e-3}}
    d = policy(cfg=REST).decide(load(4, prompt_fast), PolicyState())
    assert d.target == L and "a decode step 0%" in d.reason
    same = {"bf16": prompt_fast["bf16"], "w8a8": dict(prompt_fast["bf16"])}
    assert policy(cfg=REST).decide(load(4, same), PolicyState()).target == 0


def test_levels_dearer_than_the_budget_spend_only_quality_banked_beyond_the_ledger_tolerance():
    """A budget equal to all-W8A8's own cost (quality_no_worse_than: w8a8): served at that
    level, the ledger banks nothing, and a 4-bit rung is not allowed (it was, by a hair, and
    the evaluation then read +2.86% against static W8A8's +2.84%); tokens banked in bf16
    beyond the 0.1-point tolerance allow it."""
    from policies.demand import LEDGER_TOLERANCE

    w8a8 = QUALITY["ladder"]["ppl"][str(L)] / 20.0 - 1
    p = policy(TIGHT, CFG.model_copy(update={"max_avg_ppl_increase": w8a8}), RATIOS)
    at_w8a8 = QualityLedger(window_s=300.0)
    at_w8a8.add(10.0, 1000, RATIOS[L])
    at_w8a8.add(11.0, 100, 0.0)  # a few bf16 tokens banked: spending them to the last would allow L + 1
    upcoming = 60.0 * CFG.horizon_s  # load()'s token rate over the horizon
    assert at_w8a8.allows(RATIOS[L + 1], upcoming, w8a8)
    assert not at_w8a8.allows(RATIOS[L + 1], upcoming, w8a8 - LEDGER_TOLERANCE)
    assert p.quality_limit(load(3, AVX512, ledger=at_w8a8, time=12.0)) == L
    banked = QualityLedger(window_s=300.0)
    banked.add(10.0, 1000, RATIOS[L])
    banked.add(11.0, 1000, 0.0)  # half the window in bf16
    assert p.quality_limit(load(3, AVX512, ledger=banked, time=12.0)) > L


def test_a_move_only_for_rest_waits_until_the_pending_prompts_are_computed():
    """Resting fast is not needed for any SLO: a request arriving at an idle bf16 server is
    prefilled where it is, and the move follows at a boundary with no prompt pending."""
    arriving = load(1, AVX512, pending_prompt_tokens=20)
    d = policy(cfg=REST).decide(arriving, PolicyState())
    assert d.target == 0 and "waits until the 20 prompt tokens" in d.reason
    assert policy(cfg=REST).decide(load(1, AVX512), PolicyState()).target == L
    # a move the demand needs is not deferred
    queue = dict(capacity_blocks=TIGHT[0], need_blocks=40, waiting_blocks=31, queue_len=10.0, used_blocks=9,
                 pending_prompt_tokens=3000)
    assert policy(TIGHT, REST).decide(load(3, AVX512, **queue), PolicyState()).target > 0


# vLLM's KV blocks at each level of an fp32 server of SmolLM2 on the W8A8-only pack at a
# 594 MB budget (suite-v4-avx2-beyond-594's MorphServe run.json): 8 at level 0.
FP32_594MB = [8, 10, 12, 13, 15, 17, 19, 21, 22, 24, 26, 28, 29, 31, 33, 35, 37, 38, 40, 42, 44, 46, 47, 49, 51,
              53, 55, 56, 58, 60, 62]


def test_a_queue_no_rung_holds_takes_more_capacity_on_slower_kernels_where_it_gets_through_sooner():
    """An fp32 engine on the AVX2 EPYC at 594 MB: two requests fill level 0's 8 blocks and 16
    wait, more than any level holds within the TPOT bound. int8 is slower per step here, so
    the fallback (the most capacity whose step meets the bound) used to keep only the rungs
    no slower than level 0: level 0 itself, however long the queue. A level with more
    blocks serves a bigger batch: slower steps, but the work in the system is through sooner,
    so it is taken. Where KV does not bind (every level admits the whole batch), slower
    kernels only slow the work, and the level holds."""
    m = StepTimeModel(L, MIX[: L + 1], AVX2_FP32)
    for i in range(60):
        n = (1, 2, 3)[i % 3]
        m.observe(0, n, true_step(AVX2_FP32, 0, n))
    queued = dict(used_blocks=8, capacity_blocks=8, queue_len=16.0, waiting_blocks=32,
                  need_blocks=54, waiting_need_blocks=48, need_per_request=3.0, blocks_per_request=3.0,
                  step_time_s=true_step(AVX2_FP32, 0, 2), pending_prompt_tokens=16 * 224,
                  pending_output_tokens=18 * 130, step_model=m)
    p = make_policy(CFG, FP32_594MB, L)
    s = load(2, AVX2_FP32, **queued)
    demand = p.demand_blocks(s)
    assert not [k for k in range(L + 1) if FP32_594MB[k] >= demand * (1 + CFG.headroom)
                and p.predicted_step(s, k) <= BOUND]  # no level holds the queue within the bound
    assert all(p.slower_kernels(s, k, m.predict(0, 2.0)) for k in range(1, L + 1))  # int8 slower per step
    d = p.decide(s, PolicyState())
    assert d.target > 0 and p.predicted_step(s, d.target) <= BOUND, d.reason
    assert d.reason.startswith("speed:") and "sooner" in d.reason, d.reason

    # the plant agrees: the output still expected, decoded at the batch each level's blocks admit
    def decode_seconds(level: int) -> float:
        batch = FP32_594MB[level] / 3.0
        return true_step(AVX2_FP32, level, batch) * 18 * 130 / batch

    assert decode_seconds(d.target) < decode_seconds(0)
    # there, with the queue still waiting, it holds: no flapping back to level 0's smaller batch
    batch = FP32_594MB[d.target] // 3
    there = load(batch, AVX2_FP32, **{**queued, "level": d.target, "capacity_blocks": FP32_594MB[d.target],
                                      "step_time_s": true_step(AVX2_FP32, d.target, batch)})
    again = p.decide(there, PolicyState(level=d.target, last_change=100.0))
    assert again.target == d.target, again.reason
    # KV does not bind: every level admits the 18 requests, slower kernels only slow them
    roomy = make_policy(CFG, [100 + k for k in range(L + 1)], L)
    assert roomy.decide(load(2, AVX2_FP32, **{**queued, "capacity_blocks": 100}), PolicyState()).target == 0


def test_a_run_of_holds_keeps_its_first_and_its_latest_reason():
    from morphserve.runtime.recorder import Recorder

    r = Recorder(None)
    r.note_decision(1.0, 0, Decision(0, "hold: capacity: demand 3 blocks fits 8 at level 0", PolicyState()), False)
    r.note_decision(2.0, 0, Decision(0, "hold: speed: level 0 has the most capacity (8 blocks for demand 40)",
                                     PolicyState()), True)
    [entry] = r.decisions
    assert entry["repeats"] == 1 and entry["reason"].startswith("hold: capacity: demand 3")
    assert entry["last_reason"].startswith("hold: speed") and entry["last_time"] == 2.0
    r.note_decision(3.0, 0, Decision(2, "capacity: demand 10 blocks fits 12 at level 2", PolicyState()), True)
    assert len(r.decisions) == 2 and "last_reason" not in r.decisions[-1]


def test_the_controllers_time_between_steps_is_totalled_past_the_recent_window():
    from morphserve.runtime.recorder import Recorder

    r = Recorder(None)
    assert r.boundary_us() is None
    for i in range(2500):
        r.boundary_done(0.001 if i % 100 else 0.01)
    b = r.boundary_us()
    assert b["n"] == 2500 and abs(b["total_s"] - (2475 * 0.001 + 25 * 0.01)) < 1e-6
    assert b["p50"] == 1000.0 and b["max"] == 10000.0  # percentiles over the last 2,000


def test_compute_bound_at_every_level_with_a_queue_no_level_holds_takes_the_level_through_soonest():
    """The same 594 MB server with its steps inflated by the queued prompts' prefill chunks,
    so that every level reads over the bound: the fastest step is level 0's, the level with
    the least KV, where the queue never drains; the level that gets the work through soonest
    is taken instead. With room at every level the fastest step still decides."""
    m = StepTimeModel(L, MIX[: L + 1], AVX2_FP32)
    for i in range(60):
        n = (1, 2, 3)[i % 3]
        m.observe(0, n, true_step(AVX2_FP32, 0, n))
    queued = dict(used_blocks=8, capacity_blocks=8, queue_len=16.0, waiting_blocks=32, need_blocks=54,
                  waiting_need_blocks=48, need_per_request=3.0, blocks_per_request=3.0,
                  step_time_s=4 * true_step(AVX2_FP32, 0, 2), pending_prompt_tokens=16 * 224,
                  pending_output_tokens=18 * 130, step_model=m)
    p = make_policy(CFG, FP32_594MB, L)
    s = load(2, AVX2_FP32, **queued)
    assert all(p.predicted_step(s, k) > BOUND for k in range(L + 1))  # compute-bound at every level
    d = p.decide(s, PolicyState())
    assert d.target > 0 and "soonest" in d.reason, d.reason
    roomy = make_policy(CFG, [100 + k for k in range(L + 1)], L)
    held = roomy.decide(load(2, AVX2_FP32, **{**queued, "capacity_blocks": 100}), PolicyState())
    assert held.target == 0 and "the fastest is 0" in held.reason, held.reason


def _compute_bound_queue(prompt_tokens: float, output_tokens: float) -> tuple:
    """The 594 MB fp32 server above, compute-bound at every level with 16 requests queued, whose
    requests carry `prompt_tokens` and are expected to produce `output_tokens` each."""
    m = StepTimeModel(L, MIX[: L + 1], AVX2_FP32)
    for i in range(60):
        n = (1, 2, 3)[i % 3]
        m.observe(0, n, true_step(AVX2_FP32, 0, n))
    m.observe_prefill(0, 2, 512, true_step(AVX2_FP32, 0, 2) + 512 * 3.5e-3)  # ~3.5 ms a prompt token, as served
    queued = dict(used_blocks=8, capacity_blocks=8, queue_len=16.0, waiting_blocks=32, need_blocks=54,
                  waiting_need_blocks=48, need_per_request=3.0, blocks_per_request=3.0,
                  step_time_s=4 * true_step(AVX2_FP32, 0, 2), pending_prompt_tokens=int(16 * prompt_tokens),
                  pending_output_tokens=int(18 * output_tokens), prompt_tokens_per_request=prompt_tokens,
                  output_tokens_per_request=output_tokens, step_model=m)
    p = make_policy(CFG, FP32_594MB, L)
    return p, load(2, AVX2_FP32, **queued)


def test_where_prompts_are_the_work_capacity_is_not_bought_with_stalled_decodes():
    """The code trace's shape (333 prompt tokens for 21 output tokens a request): a level with
    more KV admits more prompts at once, and their prefill, spread over a request's few output
    tokens, stalls every decode beside them. The work gets through sooner there, but its
    requests would break TPOT (measured: all-W8A8 taken so, 49 of 55 requests over TPOT
    against plain fp32's 16), so the fastest level holds, and says why. The conv trace's shape
    (224 for 142) still takes the level through soonest: there the stall is small."""
    p, s = _compute_bound_queue(333, 21)
    assert all(p.predicted_step(s, k) > BOUND for k in range(L + 1))  # compute-bound at every level
    soonest = min(range(L + 1), key=lambda j: p.work_at(s, j, 0))
    assert soonest > 0 and p.work_at(s, soonest, 0) < 0.95 * p.work_at(s, 0, 0)  # what the fallback took before
    assert p.step_beside_prompts(s, soonest) > max(BOUND, p.step_beside_prompts(s, 0))
    d = p.decide(s, PolicyState())
    assert d.target == 0 and "stall the decodes" in d.reason, d.reason

    p, s = _compute_bound_queue(224, 142)
    d = p.decide(s, PolicyState())
    assert d.target > 0 and "soonest" in d.reason, d.reason
    assert p.step_beside_prompts(s, d.target) <= BOUND


def test_the_step_beside_prompts_is_the_decode_step_where_request_sizes_are_not_known():
    p, s = _compute_bound_queue(333, 21)
    bare = dataclasses.replace(s, prompt_tokens_per_request=0.0, output_tokens_per_request=0.0)
    for k in (0, 10, L):
        assert p.step_beside_prompts(bare, k) == pytest.approx(s.step_model.predict(k, p.batch_at(s, k)))
        assert p.step_beside_prompts(s, k) > p.step_beside_prompts(bare, k)


# vLLM's KV blocks at each level of a fresh fp32 server of SmolLM2 on the W8A8-only pack with
# 26 fp32 blocks of KV (scripts/bench_policy.py --dtype float32 --fp16-blocks 26): 25 at level
# 0, 78 at level 30.
FP32_26_BLOCKS = [25 + round(53 * k / L) for k in range(L + 1)]


def test_a_fresh_servers_first_burst_is_judged_by_the_profile_not_sent_to_the_most_kv():
    """No step served yet, 16 prompts of ~300 tokens arrive at once (more prompt than any level
    computes within the TTFT bound) and every level holds them. With nothing predicted, the
    last fallback took the rung with the most KV: an fp32 server on the AVX2 EPYC went to
    all-W8A8, where int8 decodes 2.6x slower, for the whole burst. With the profile and a
    prior base every level is predicted before the first step: level 0 gets the work
    through soonest there, and a W8A8 rung where int8 is the faster kernel (AVX-512)."""
    burst = dict(queue_len=16.0, used_blocks=0, capacity_blocks=FP32_26_BLOCKS[0], waiting_blocks=32,
                 need_blocks=64, waiting_need_blocks=64, need_per_request=4.0, blocks_per_request=4.0,
                 step_time_s=0.0, pending_prompt_tokens=16 * 300, pending_output_tokens=16 * 60,
                 remaining_tokens=0)
    fresh = StepTimeModel(L, MIX[: L + 1], AVX2_FP32)
    assert fresh.predict(0, 16) is not None and not fresh.known(0)  # a prior, not a lesson
    assert fresh.predict(0, 16) < fresh.predict(L, 16)  # int8 slower at this batch here
    p = make_policy(CFG, FP32_26_BLOCKS, L)
    d = p.decide(load(0, AVX2_FP32, **burst, step_model=fresh), PolicyState())
    assert d.target == 0, d.reason
    assert "no level up to" not in d.reason, d.reason
    # the model as it was (no prior: nothing predicted before a step) took the top rung for its KV
    class Unprimed(StepTimeModel):
        def predict(self, level, running):
            return super().predict(level, running) if self._usable(level) is not None else None

    blind = make_policy(CFG, FP32_26_BLOCKS, L).decide(
        load(0, AVX2_FP32, **burst, step_model=Unprimed(L, MIX[: L + 1], AVX2_FP32)), PolicyState())
    assert blind.target == L and "no level up to" in blind.reason, blind.reason
    # where int8 is the faster kernel at every batch, the same fresh burst rests on W8A8 rungs
    fast_int8 = StepTimeModel(2 * L, MIX, AVX512)
    d = make_policy(CFG, FP32_26_BLOCKS + [78 + k for k in range(1, L + 1)], 2 * L).decide(
        load(0, AVX512, **burst, step_model=fast_int8), PolicyState())
    assert 0 < d.target <= L, d.reason


def test_the_first_served_steps_replace_the_prior_base():
    m = StepTimeModel(L, MIX[: L + 1], AVX2_FP32)
    prior = m.predict(0, 4)
    for i in range(10):
        m.observe(0, 4, 0.5)  # a slow machine: half a second a step at batch 4
    assert m.known(0) and abs(m.predict(0, 4) - 0.5) < 1e-6 and prior < 0.1


def test_prompt_twins_price_a_prompt_below_their_level_as_one_at_it():
    """A server holding prompt twins for the first N layers computes a prompt step through
    them at any level below N: a move up to a level at or below N buys the prompt nothing
    and slows every decode (on the AVX2 EPYC's code row the policy climbed to levels 11-14
    "for speed" under 20 twins). The model prices such a prompt as one at level N, so a
    prompt the twins already serve in time moves nothing, and one they do not moves past
    them."""
    p = policy()
    plain = prompt_waiting(1000)
    # without twins: a speed move to the first rung that gives it its first token in time
    d = p.decide(plain, PolicyState())
    first, bound = d.target, CFG.ttft_slo_s * CFG.slo_margin
    assert d.reason.startswith("speed:") and p.prompt_seconds(plain, first) <= bound < p.prompt_seconds(plain, first - 1)
    covered = prompt_waiting(1000)
    covered.step_model.prompt_twin_layers = first
    assert [p.prompt_seconds(covered, k) for k in range(first + 1)] == [p.prompt_seconds(covered, first)] * (first + 1)
    assert p.decide(covered, PolicyState()).target == 0
    short = prompt_waiting(1000)
    short.step_model.prompt_twin_layers = first - 1
    assert p.decide(short, PolicyState()).target == first


NEXT = REST.model_copy(update={"idle_rest": "next_request"})


def test_idle_rest_next_request_waits_where_the_next_request_would_be_moved():
    """`idle_rest: next_request`: past fast_rest_idle_s without a request, an idle server stays
    on (or goes up to) the run of faster rungs at batch 1, where its next request would be
    moved at that request's first boundary; where int8 is slower at batch 1 that is bf16, as
    with `quality`."""
    idle = dict(used_blocks=0, need_blocks=0, step_time_s=0.0)
    last_request = 150.0
    s = load(0, AVX512, level=L, time=162.0, **idle)
    state = PolicyState(level=L, last_change=100.0, calm_since=158.0, busy_at=last_request)
    assert policy(cfg=REST).decide(s, state).target == 0  # `quality`: back to bf16
    held = policy(cfg=NEXT).decide(s, state)
    assert held.target == L and "next request" in held.reason, held.reason
    # a server that has never served (or was handed back at bf16) moves up while idle
    fresh = policy(cfg=NEXT).decide(load(0, AVX512, time=5.0, **idle), PolicyState())
    assert fresh.target == L and fresh.reason.startswith("speed:") and "next request" in fresh.reason
    assert fresh.state.busy_at == float("-inf")  # an idle boundary is not a request
    # AVX2-only: one request decodes faster in bf16, so an idle server waits in bf16
    assert policy(cfg=NEXT).decide(load(0, AVX2, time=5.0, **idle), PolicyState()).target == 0
    assert policy(cfg=NEXT).decide(load(0, AVX2, level=L, time=162.0, **idle), state).target == 0


def test_only_next_request_idle_rest_asks_for_idle_boundaries():
    assert policy(cfg=NEXT).moves_while_idle()
    assert not policy(cfg=REST).moves_while_idle() and not policy().moves_while_idle()
    assert not policy(cfg=CFG.model_copy(update={"idle_rest": "next_request"})).moves_while_idle()  # no fast rest


def test_a_kv_cache_dearer_than_the_budget_at_level_0_is_named_at_start():
    """An FP8 cache measured at +7.38% on an AMX Xeon, over `default`'s +5% cap: every level
    is over budget, so the policy can only hold level 0, and the start says so once."""
    from morphserve.offline import kv_cost
    from policies.config import budget_below_level0, load_policy, resolve_budget

    default, _ = load_policy("default")
    factors = kv_cost.factors_by_level({0: 1.0738, 15: 1.0800, 30: 1.0588, 45: 1.0736, 60: 1.0919}, 2 * L)
    dear = {**QUALITY, "kv_cost": {"dtype": "fp8", "factor_by_level": {str(k): f for k, f in factors.items()}}}
    cfg = resolve_budget(default, dear, MIX)
    ratios = log_ppl_ratios(dear, 2 * L)
    why = budget_below_level0(cfg, ratios)
    assert why is not None and "+5.00%" in why and "+7.38%" in why
    # what the warning foretells: no level above 0 is allowed, whatever the load
    assert policy(cfg=cfg, ratios=ratios).quality_limit(load(12, AVX512, ledger=QualityLedger(window_s=300.0))) == 0
    cheap = {**QUALITY, "kv_cost": {"dtype": "fp8", "factor_by_level": {str(k): 1.02 for k in range(2 * L + 1)}}}
    assert budget_below_level0(resolve_budget(default, cheap, MIX), log_ppl_ratios(cheap, 2 * L)) is None
    assert budget_below_level0(resolve_budget(default, QUALITY, MIX), RATIOS) is None  # a bf16 cache


# An AMX Xeon's profile as `morphserve doctor --remeasure` timed it (us a layer, 2 vCPUs): below 256
# tokens a W8A8 prompt token costs what a bf16 one does; from 256 to 1024, 0.44x.
AMX = {"bf16": {1: 340e-6, 8: 342e-6, 32: 419e-6, 256: 1058e-6, 1024: 4472e-6},
       "w8a8": {1: 104e-6, 8: 161e-6, 32: 220e-6, 256: 866e-6, 1024: 2363e-6},
       "w4a16": {1: 506e-6, 8: 491e-6, 32: 615e-6, 256: 1210e-6, 1024: 3372e-6}}


def test_a_prompt_is_priced_by_the_profiles_slope_at_prompt_sizes():
    """The prompt slope comes from the profile's two largest points: with the 1024-token
    point all-W8A8 prefills a long prompt in about half bf16's linear time, and a move up
    takes the W8A8 rungs whole for it; cut at 256 (what the profile timed before), the two
    are level and the same move stops at the first sufficient rung."""
    cut = {t: {b: s for b, s in v.items() if b <= 256} for t, v in AMX.items()}
    full, short = StepTimeModel(2 * L, MIX, AMX), StepTimeModel(2 * L, MIX, cut)
    assert full._slopes[L] < 0.5 * full._slopes[0]
    assert short._slopes[L] > 0.95 * short._slopes[0]
    prompt = dict(capacity_blocks=TIGHT[0], need_blocks=30, waiting_blocks=21, queue_len=1.0, used_blocks=9,
                  pending_prompt_tokens=1500)
    need = next(k for k, c in enumerate(TIGHT) if c >= 30 * 1.1)
    assert policy(TIGHT).decide(load(1, AMX, **prompt), PolicyState()).target == L
    assert policy(TIGHT).decide(load(1, cut, **prompt), PolicyState()).target == need
