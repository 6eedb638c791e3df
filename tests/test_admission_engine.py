"""The admission cap's mechanism on the real vLLM scheduler: the limit the controller sets
at a step boundary (SchedulerView.set_admission_cap, vLLM 0.32's max_num_active_reqs) bounds
the requests running at once, a limit under the running count preempts nothing, and None
gives vLLM's own limit back. (Where the cap comes from is pure logic: tests/test_admission.py.)"""

from __future__ import annotations

import pytest

from morphserve.vllm.offline_engine import controller_of, run_greedy, running_requests
from tests.engine_utils import PROMPTS, morph_llm

pytestmark = [pytest.mark.engine, pytest.mark.quant]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine(model_dir, pack_dir, fast_dtype):
    llm, core = morph_llm(model_dir, pack_dir, "identity", dtype=fast_dtype)
    yield llm, core
    del llm


def _run(llm, core, on_step=None) -> tuple[dict, list[int]]:
    running: list[int] = []

    def step(n: int) -> None:
        running.append(running_requests(core))
        if on_step is not None:
            on_step(n)

    tokens = run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, MAX_TOKENS, step).tokens
    return tokens, running


def test_the_cap_bounds_the_requests_running_and_none_gives_vllms_limit_back(engine):
    llm, core = engine
    view = controller_of(core).scheduler
    assert len(PROMPTS) >= 4
    assert view.set_admission_cap(2) == 2
    tokens, running = _run(llm, core)
    assert max(running) == 2, running
    assert sorted(map(len, tokens.values())) == [MAX_TOKENS] * len(PROMPTS)
    configured = view.set_admission_cap(None)
    assert configured >= len(PROMPTS)
    tokens, running = _run(llm, core)
    assert max(running) == len(PROMPTS), running  # every prompt admitted at once again
    assert len(tokens) == len(PROMPTS)


def test_a_cap_under_the_running_count_preempts_nothing(engine):
    llm, core = engine
    view = controller_of(core).scheduler

    def lower_after_the_first_step(n: int) -> None:
        if n == 1:
            view.set_admission_cap(1)

    try:
        tokens, running = _run(llm, core, lower_after_the_first_step)
    finally:
        view.set_admission_cap(None)
    assert running[0] == len(PROMPTS), running  # all admitted before the cap fell
    # nobody was put back to waiting: the count only falls, one finish at a time at most per step
    assert all(b <= a for a, b in zip(running, running[1:])), running
    assert sorted(map(len, tokens.values())) == [MAX_TOKENS] * len(PROMPTS)


def test_a_token_budget_cuts_the_prompts_into_chunks_and_none_gives_vllms_budget_back(engine):
    llm, core = engine
    view = controller_of(core).scheduler
    prompt_tokens = sum(len(llm.get_tokenizer().encode(p)) for p in PROMPTS)
    budget = 4
    assert prompt_tokens > 2 * budget
    configured = view.set_token_budget(None)
    assert configured >= prompt_tokens
    free_steps = len(run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, MAX_TOKENS).step_seconds)
    assert view.set_token_budget(budget) == budget
    try:
        run = run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, MAX_TOKENS)
    finally:
        assert view.set_token_budget(None) == configured
    # every prompt token, and every output token but each request's last, takes a scheduled
    # slot, at most `budget` of them a step
    least = -(-(prompt_tokens + len(PROMPTS) * (MAX_TOKENS - 1)) // budget)
    assert free_steps < least <= len(run.step_seconds), (free_steps, least, len(run.step_seconds))
    assert sorted(map(len, run.tokens.values())) == [MAX_TOKENS] * len(PROMPTS)
