"""The admission cap (policies.admission): pure logic over the real step-time model, and the
demand policy's wrapper around it. Milliseconds, no engine."""

from __future__ import annotations

from dataclasses import dataclass, replace

from policies.admission import admission_cap, kv_admission_cap, step_at
from policies.config import PolicyConfig
from policies.demand import DemandPolicy
from policies.signals import Signals
from policies.step_model import StepTimeModel

BOUND = 0.16  # 0.2 s TPOT x 0.8 margin


def learned(base: float, per_request: float, level: int = 3) -> StepTimeModel:
    """A model without a profile that served `level` at batches 1..40: step = base + per_request x b."""
    model = StepTimeModel(num_layers=4)
    for _ in range(3):
        for b in range(1, 41):
            model.observe(level, b, base + per_request * b)
    return model


@dataclass
class FakePrompts:
    """Decode steps of base + slope x b and a fixed prefill time per prompt: the prompt term alone."""
    base: float
    slope: float
    prefill_s: float | None

    def known(self, level: int) -> bool:
        return True

    def predict(self, level: int, running: float) -> float:
        return self.base + self.slope * running

    def prefill_seconds(self, level: int, prompt_tokens: float) -> float | None:
        return self.prefill_s


def test_the_cap_is_the_largest_batch_whose_step_meets_the_bound():
    model = learned(0.02, 0.01)
    cap = admission_cap(model, 3, BOUND, 0, 0, kv_batch=50)
    assert cap == 14  # 0.02 + 0.01 x 14 = 0.16; 15 would take 0.17
    assert model.predict(3, cap) <= BOUND < model.predict(3, cap + 1)


def test_no_cap_where_the_levels_kv_binds_first():
    assert admission_cap(learned(0.02, 0.01), 3, BOUND, 0, 0, kv_batch=12) is None


def test_no_cap_where_one_request_alone_breaks_the_bound():
    assert admission_cap(learned(0.2, 0.01), 3, BOUND, 0, 0, kv_batch=50) is None


def test_no_cap_for_a_level_the_model_cannot_predict_or_without_a_model():
    model = learned(0.02, 0.01, level=3)
    assert not model.known(1)
    assert admission_cap(model, 1, BOUND, 0, 0, kv_batch=50) is None
    assert admission_cap(None, 3, BOUND, 0, 0, kv_batch=50) is None
    assert admission_cap(model, 3, BOUND, 0, 0, kv_batch=1) is None


def test_the_others_prompts_lower_the_cap_where_outputs_are_short():
    """The code trace's shape: long prompts, short outputs. Each other member's prefill lands
    in the steps of one request's output, so a batch that decodes within the bound can still
    break it beside its prompts."""
    decode_only = admission_cap(FakePrompts(0.02, 0.005, None), 0, BOUND, 300, 20, kv_batch=60)
    with_prompts = admission_cap(FakePrompts(0.02, 0.005, 0.1), 0, BOUND, 300, 20, kv_batch=60)
    assert decode_only == 28  # 0.02 + 0.005 x 28 = 0.16
    assert with_prompts == 14  # 0.02 + 0.005 x 14 + 13 x 0.1 / 20 = 0.155; 15 would take 0.165
    assert step_at(FakePrompts(0.02, 0.005, 0.1), 0, 15, 300, 20) > BOUND >= step_at(
        FakePrompts(0.02, 0.005, 0.1), 0, 14, 300, 20)


def test_the_demand_policy_caps_only_when_told_to():
    model = learned(0.02, 0.01)
    s = Signals(step_model=model, need_per_request=2.0, running=10, queue_len=30)
    capacity = [20, 40, 60, 80, 100]
    off = DemandPolicy(PolicyConfig(policy="demand"), capacity, 4)
    on = DemandPolicy(PolicyConfig(policy="demand", admission_cap=True), capacity, 4)
    assert off.admission(s, 3) is None
    assert on.admission(s, 3) == 14  # level 3's 80 blocks hold 40 requests of 2 blocks
    assert on.admission(s, 4) is None  # level 4 never served: the model does not know it
    s_small = Signals(step_model=model, need_per_request=8.0, running=10, queue_len=30)
    assert on.admission(s_small, 3) is None  # 80 / 8 = 10 requests: the KV binds first


def test_the_kv_gate_admits_waiting_requests_in_order_while_their_completion_fits():
    """Capacity 54 blocks; the running requests will hold 40 at completion. Waiting (in
    vLLM's order): 6, 5, 9, 1. The first two fit (11 of the 14 free); the third does not,
    and the fourth, though small, is not admitted past it (vLLM admits in order, and the cap
    is a count)."""
    assert kv_admission_cap(54, 10, 40, (6, 5, 9, 1)) == 12
    assert kv_admission_cap(54, 10, 40, (6, 5)) is None  # everything waiting fits: no cap
    assert kv_admission_cap(54, 10, 40, ()) is None  # nothing waits
    assert kv_admission_cap(54, 10, 54, (1,)) == 10  # full at completion: hold the queue
    assert kv_admission_cap(54, 12, 60, (3,)) == 12  # already over (an estimate grew): still none preempted
    assert kv_admission_cap(20, 0, 0, (30, 2)) == 1  # an empty engine always takes one, however big


def test_the_demand_policy_gates_on_kv_only_when_told_to_and_takes_the_lower_cap():
    capacity = [20, 40, 60, 80, 100]
    s = Signals(step_model=learned(0.02, 0.01), need_per_request=2.0, running=10, queue_len=30,
                running_now=10, running_need_blocks=70, waiting_needs=(4, 4, 4, 4))
    off = DemandPolicy(PolicyConfig(policy="demand"), capacity, 4)
    kv = DemandPolicy(PolicyConfig(policy="demand", kv_admission=True), capacity, 4)
    both = DemandPolicy(PolicyConfig(policy="demand", kv_admission=True, admission_cap=True), capacity, 4)
    assert off.admission(s, 3) is None
    assert kv.admission(s, 3) == 12  # level 3: 80 blocks, 70 held at completion, two more of 4 fit
    assert kv.admission(s, 4) is None  # level 4: 100 blocks, 30 free: all four waiting fit, no cap
    assert both.admission(s, 3) == 12  # the TPOT cap (14) is the higher one here
    assert kv.admission(replace(s, waiting_needs=()), 3) is None
    assert "waiting_needs" not in s.as_dict()  # a list kept out of every logged record
