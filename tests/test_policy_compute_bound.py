"""The demand policy where the CPU, not KV, runs out (plain Python, milliseconds): rungs are
ranked by what a whole request costs there (its prompt and its share of the decode steps),
not by the decode step alone, and a faster rung below is taken under load instead of
waiting for a calm that a compute-bound window never gives; neither move flaps.

The profile is shaped like a Zen 4 EPYC's kernel readings: W8A8 faster than bf16 at every
batch, W4A16 the fastest decode at batch 1 but slower from batch 8 on and 3.3x W8A8's cost
at 256 prompt tokens."""

from __future__ import annotations

import dataclasses

from policies import PolicyState, make_policy
from policies.demand import FURTHER_GAIN
from tests.test_policy_rungs import BOUND, CFG, L, WIDE, load, policy, true_step

ZEN4 = {"bf16": {1: 0.75e-3, 8: 0.9e-3, 32: 2.0e-3, 256: 10.0e-3},
        "w8a8": {1: 0.62e-3, 8: 0.66e-3, 32: 1.0e-3, 256: 3.5e-3},
        "w4a16": {1: 0.44e-3, 8: 0.9e-3, 32: 2.6e-3, 256: 11.6e-3}}


def arriving(running: float, level: int, inflation: float = 19.0, queue: float = 0.0) -> object:
    """Compute-bound steps: the last window's mean step is `inflation` x the plant's decode
    step (prefill chunks of ~400-token prompts beside a few decodes), requests keep
    arriving (0.33/s) with 398 prompt tokens and 16 expected output tokens each."""
    return load(running, ZEN4, level=level, step_time_s=inflation * true_step(ZEN4, level, running),
                queue_len=queue, arrival_rate=0.33, token_rate=300.0, prompt_tokens_per_request=398.5,
                output_tokens_per_request=16.0, pending_output_tokens=int(16 * running))


def test_compute_bound_rungs_are_ranked_by_a_whole_request_not_the_decode_step():
    """At batch 1-2 the W4A16 rungs decode fastest, and the old fallback took them ("the
    fastest is 33" on a Zen 4: 3 W4A16 layers) though every arriving prompt then paid their
    slower prefill; counted per request (prompt + its share of the decodes) all-W8A8 is
    cheaper, so the server stays there."""
    p = policy()
    s = arriving(1.5, L)
    assert all(p.predicted_step(s, k) > BOUND for k in range(2 * L + 1))  # compute-bound at every level
    by_step = min(range(2 * L + 1), key=lambda k: p.predicted_step(s, k))
    assert by_step > L  # what the decode step alone ranks first: a W4A16 rung
    assert p.request_seconds(s, L, 1.5) < p.request_seconds(s, by_step, 1.5)
    d = p.decide(s, PolicyState(level=L, last_change=90.0))
    assert d.target == L and "the fastest is" in d.reason and "computes a request" in d.reason, d.reason


def test_the_compute_bound_fallback_stays_for_a_gain_inside_the_profiles_noise():
    """Where prompt sizes are not known yet the decode step ranks the rungs; a rung less than
    FURTHER_GAIN faster is not worth a move (and the quality it spends)."""
    p = make_policy(CFG, WIDE, L + 3)  # a cap at 3 W4A16 layers
    s = dataclasses.replace(arriving(1.5, L + 1), prompt_tokens_per_request=0.0, output_tokens_per_request=0.0)
    assert p.predicted_step(s, L + 3) < p.predicted_step(s, L + 1)  # two more W4A16 layers: a hair faster
    assert p.predicted_step(s, L + 3) > (1 - FURTHER_GAIN) * p.predicted_step(s, L + 1)
    d = p.decide(s, PolicyState(level=L + 1, last_change=90.0))
    assert d.target == L + 1 and "staying at" in d.reason, d.reason


def test_a_faster_rung_below_is_taken_under_load_without_waiting_for_calm():
    """At level L + 3 with 6 requests decoding and 2 queued, L computes a request sooner (its
    W8A8 prefill and decode at this batch): the old policy wanted it and held L + 3 'waiting for
    calm' (93 s on a Zen 4 EPYC); now it moves at once, past the cooldown only."""
    p = policy()
    s = arriving(6, L + 3, queue=2.0)
    assert p.request_seconds(s, L, 6) < p.request_seconds(s, L + 3, 6)
    d = p.decide(s, PolicyState(level=L + 3, last_change=90.0))
    assert d.target == L and "under load" in d.reason, d.reason
    held = p.decide(s, PolicyState(level=L + 3, last_change=s.time - CFG.cooldown_s / 2))
    assert held.target == L + 3 and "cooldown" in held.reason, held.reason


def test_a_move_down_under_load_keeps_the_capacity_the_demand_needs():
    """A rung below that is faster but holds fewer blocks than the demand is not taken."""
    tight = [100] * (L + 1) + [100 + 50 * k for k in range(1, L + 1)]
    p = policy(capacity=tight)
    s = dataclasses.replace(arriving(6, L + 3, queue=2.0), need_blocks=300, used_blocks=200, waiting_blocks=100)
    d = p.decide(s, PolicyState(level=L + 3, last_change=90.0))
    assert d.target >= L + 3, d.reason


def test_compute_bound_moves_do_not_flap_as_the_batch_breathes():
    """A compute-bound window whose batch rises and falls (1 -> 8 -> 1, twice): the server
    settles on all-W8A8 and stays; no rung is entered twice."""
    p = policy()
    state, moves = PolicyState(level=L, last_change=0.0), []
    batches = [1, 1.5, 2, 3, 4, 6, 8, 8, 6, 4, 3, 2, 1.5, 1] * 2
    for i, n in enumerate(batches):
        s = dataclasses.replace(arriving(n, state.level, queue=1.0 if n > 3 else 0.0), time=100.0 + 2.0 * i)
        d = p.decide(s, state)
        if d.target != state.level:
            moves.append((state.level, d.target))
        state = d.state
    assert len(moves) <= 1 and state.level == L, moves
