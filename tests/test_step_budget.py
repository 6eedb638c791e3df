"""The step token budget (policies.step_budget): pure logic over the real step-time model,
and the demand policy's wrapper around it. Milliseconds, no engine. (The mechanism on vLLM's
scheduler: tests/test_admission_engine.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from policies.config import PolicyConfig
from policies.demand import DemandPolicy
from policies.signals import Signals
from policies.step_budget import MIN_PROMPT_TOKENS, step_token_budget
from policies.step_model import StepTimeModel

BOUND = 0.16  # 0.2 s TPOT x 0.8 margin
# seconds per decoder layer's linears at a batch: bf16 and W8A8, 2 layers
PROFILE = {"bf16": {1: 0.002, 32: 0.010, 256: 0.060}, "w8a8": {1: 0.001, 32: 0.006, 256: 0.030}}
MIX = [{}, {"w8a8": 1}, {"w8a8": 2}]


def profiled() -> StepTimeModel:
    """A profiled model whose base learned 0.01 s + 0.001 s per request, and a prompt's
    shared cost 0.5 ms per token from a served prefill step."""
    model = StepTimeModel(num_layers=2, mix=MIX, profile=PROFILE)
    for _ in range(3):
        for b in range(1, 21):
            model.observe(2, b, 0.01 + 0.001 * b + model.tier_part(2, b))
    decode = model.predict(2, 4)
    model.observe_prefill(2, 4, 1000, decode + 1000 * (0.0005 + model._slopes[2]))
    return model


def test_the_budget_is_the_decodes_plus_the_prompt_tokens_that_fit_beside_them_in_the_bound():
    model = profiled()
    decode, per_token = model.predict(2, 4), model.prefill_seconds(2, 1.0)
    budget = step_token_budget(model, 2, BOUND, running=4)
    prompt = budget - 4
    assert prompt == int((BOUND - decode) / per_token)
    assert decode + prompt * per_token <= BOUND < decode + (prompt + 1) * per_token
    assert prompt > MIN_PROMPT_TOKENS  # the bound, not the floor, decides here


def test_a_slower_level_gets_a_smaller_budget():
    model = profiled()
    assert step_token_budget(model, 0, BOUND, 4) < step_token_budget(model, 2, BOUND, 4)


def test_more_decodes_leave_fewer_prompt_tokens():
    model = profiled()
    few, many = step_token_budget(model, 2, BOUND, 2), step_token_budget(model, 2, BOUND, 16)
    assert many - 16 < few - 2


def test_a_prompt_always_advances_even_where_the_decodes_alone_break_the_bound():
    model = profiled()
    assert model.predict(2, 4) > 0.001
    assert step_token_budget(model, 2, 0.001, 4) == 4 + MIN_PROMPT_TOKENS


def test_no_budget_with_nothing_running_or_nothing_to_predict_from():
    assert step_token_budget(profiled(), 2, BOUND, 0) is None
    assert step_token_budget(None, 2, BOUND, 4) is None
    fresh = StepTimeModel(num_layers=2, mix=MIX)  # no profile, no steps served
    assert step_token_budget(fresh, 2, BOUND, 4) is None


def test_without_a_profile_there_is_no_prompt_cost_and_so_no_budget():
    model = StepTimeModel(num_layers=2, mix=MIX)
    for _ in range(3):
        for b in range(1, 21):
            model.observe(2, b, 0.01 + 0.002 * b)
    assert model.known(2) and model.prefill_seconds(2, 1.0) is None
    assert step_token_budget(model, 2, BOUND, 4) is None


@pytest.mark.parametrize("on", [False, True])
def test_the_demand_policy_budgets_only_where_asked(on: bool):
    cfg = PolicyConfig(policy="demand", step_token_budget=on)
    policy = DemandPolicy(cfg, [10, 20, 30], 2)
    s = replace(Signals(), running_now=4, step_model=profiled())
    budget = policy.token_budget(s, 2)
    if on:
        assert budget == step_token_budget(s.step_model, 2, cfg.tpot_slo_s * cfg.slo_margin, 4)
    else:
        assert budget is None
    assert policy.token_budget(None, 2) is None


def test_the_budget_is_off_by_default():
    assert PolicyConfig(policy="demand").step_token_budget is False
