"""The exact quality charge of a server holding prompt twins: only the steps the twins
computed (at least `min_tokens` tokens) are charged at the twins' level, by the policy's
ledger and by the evaluation alike; the evaluation takes the share from the server's own
count between two readings. Pure logic, milliseconds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from morphserve.evaluation import quality
from morphserve.offline.ladder import with_prompt_twins
from morphserve.vllm.scheduler import StepSampler
from policies import make_tracker
from policies.config import PolicyConfig, charged_level, log_ppl_ratios, prompt_twin_min_tokens
from policies.signals import StepSample

CURVE = {0: 10.0, 1: 10.1, 2: 10.3, 3: 10.6, 4: 11.0}
QUALITY = {"orders": {"lis": {"ppl": {str(k): v for k, v in CURVE.items()}}}}
TWINS = with_prompt_twins(QUALITY, 2, min_tokens=128)


def _sample(t: float, tokens: int, served: int, level: int = 0) -> StepSample:
    return StepSample(time=t, waiting=0, oldest_wait_s=0.0, running=1, used_blocks=2, capacity_blocks=9,
                      tokens=tokens, served_tokens=served, level=level)


def test_the_mark_carries_the_twins_smallest_step_and_a_mark_without_it_charges_every_step():
    assert prompt_twin_min_tokens(TWINS) == 128
    assert prompt_twin_min_tokens(with_prompt_twins(QUALITY, 2)) is None  # a mark from before: upper bound
    assert prompt_twin_min_tokens(QUALITY) is None
    assert [charged_level(TWINS, k, through_twins=False) for k in range(5)] == [0, 1, 2, 3, 4]
    assert [charged_level(TWINS, k) for k in range(5)] == [2, 2, 2, 3, 4]


def test_the_ledger_charges_a_prompt_step_at_the_twins_level_and_a_decode_step_at_its_own():
    cfg = PolicyConfig(policy="demand", max_avg_ppl_increase=0.05)
    twin, plain = log_ppl_ratios(TWINS, 4), log_ppl_ratios(TWINS, 4, through_twins=False)
    tracker = make_tracker(cfg, 4, twin, plain_log_ratios=plain, twin_min_tokens=128)
    tracker.add(_sample(0.0, tokens=300, served=301))  # a 300-token prompt and its first token
    for i in range(1, 100):  # 99 decode steps of one token
        s = tracker.add(_sample(i * 0.05, tokens=1, served=1))
    exact = math.expm1((301 * math.log(10.3 / 10.0) + 99 * 0.0) / 400)
    assert s.quality_tokens == 400 and s.quality_increase == pytest.approx(exact)
    assert exact < 10.3 / 10.0 - 1  # below the old charge (every token at level 2)
    assert tracker.served_by_level == {0: 400} and tracker.twin_served_by_level == {0: 301}
    # a step carrying a prompt carries its decodes through the twins too; above the twins'
    # level nothing changes
    tracker.add(_sample(6.0, tokens=200, served=5, level=3))
    assert tracker.twin_served_by_level == {0: 301, 3: 5} and tracker.served_by_level[3] == 5
    # without the smallest step (a mark from before) every step is a twin step, as before
    old = make_tracker(cfg, 4, twin, plain_log_ratios=None, twin_min_tokens=None)
    old.add(_sample(0.0, tokens=1, served=1))
    assert old.ledger.average_increase() == pytest.approx(0.03) and old.twin_served_by_level == {}


def test_the_evaluation_charges_the_twins_share_of_each_level_and_keeps_the_upper_bound():
    rows = [{"start_mono": 100.0, "ok": True, "input_len": 300, "output_len": 100,
             "token_offsets_s": [0.5 + 0.05 * i for i in range(100)]}]
    before = {"by_level": {"0": 50}, "through_twins": {"0": 20}, "twin_min_tokens": 128}
    after = {"by_level": {"0": 450}, "through_twins": {"0": 321}, "twin_min_tokens": 128}
    share = quality.twin_share_between(before, after)
    assert share == {0: pytest.approx(301 / 400)}
    run = quality.quality_of_run(rows, CURVE, [], 0, charge_floor=2, twin_share=share)
    assert run["ppl_increase"] == pytest.approx(math.expm1(301 / 400 * math.log(1.03)))
    assert run["ppl_increase_upper_bound"] == pytest.approx(0.03)
    assert run["twin_share_by_level"] == {"0": 0.7525}
    assert run["tokens_by_level"] == {"prompt": {"0": 300}, "output": {"0": 100}}  # the levels in force
    # no share (a cut run, or a server before the count): the upper bound, as before
    assert quality.quality_of_run(rows, CURVE, [], 0, charge_floor=2)["ppl_increase"] == pytest.approx(0.03)
    # a level the server counted nothing at is charged on the safe side
    at3 = quality.quality_of_run(rows, CURVE, [(50.0, 1)], 0, charge_floor=2, twin_share=share)
    assert at3["ppl_increase"] == pytest.approx(0.03)
    # without twins nothing changes
    assert "ppl_increase_upper_bound" not in quality.quality_of_run(rows, CURVE, [], 0)


@pytest.mark.parametrize("before, after", [
    (None, {"by_level": {}, "through_twins": {}, "twin_min_tokens": 128}),
    ({"by_level": {}, "through_twins": {}, "twin_min_tokens": 128}, None),
    ({"by_level": {}, "through_twins": {}, "twin_min_tokens": None},
     {"by_level": {"0": 5}, "through_twins": {}, "twin_min_tokens": None}),
])
def test_no_share_without_both_readings_of_a_server_that_counts_twin_steps(before, after):
    assert quality.twin_share_between(before, after) is None


def _request(rid: str, prompt: int, computed: int = 0, outputs: int = 0):
    return SimpleNamespace(request_id=rid, num_prompt_tokens=prompt, num_computed_tokens=computed,
                           num_output_tokens=outputs, num_preemptions=0, arrival_time=0.0, max_tokens=1)


def test_a_request_scheduled_and_finished_in_one_step_is_counted_in_that_step():
    """A one-token request goes from waiting to finished between two boundaries: its prompt
    is served and its step's tokens computed, so the step counts as the twins' (and the
    ledger charges its tokens)."""
    r = _request("a", prompt=300)
    scheduler = SimpleNamespace(requests={"a": r}, running=[], waiting=[r], block_size=16)
    pool = SimpleNamespace(visible=9, store=SimpleNamespace(num_free=lambda: 9))
    sampler = StepSampler()
    first = sampler.sample(scheduler, pool)
    assert first.tokens == 0 and first.served_tokens == 0
    r.num_computed_tokens, r.num_output_tokens = 300, 1  # scheduled, computed and finished by one step
    scheduler.requests, scheduler.waiting = {}, []
    step = sampler.sample(scheduler, pool)
    assert step.tokens == 300 and step.served_tokens == 301
