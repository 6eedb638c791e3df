"""Prompt twins in a real engine (fp32, the pack served W8A8-only, as every CPU's vLLM build
runs it): with every layer twinned, a prompt's step computes what static W8A8 serving
computes and a short request decodes exactly as plain fp32 vLLM; a move to the top installs
the resident twins without building any, a move back keeps them; the budget holds them at
level 0 and not at the top."""

from __future__ import annotations

import pytest

from morphserve.evaluation.systems import static_w8a8_dir
from morphserve.harness.kv_shape import kv_block_bytes
from morphserve.vllm.offline_engine import controller_of, layer_set_of
from quant_layers.swappable import HeldTwin, SplitForward
from tests.engine_utils import (greedy_tokens, morph_llm, plain_job, plain_vllm_many, score_windows,
                                skip_unless_w8a8_runs_in)

pytestmark = [pytest.mark.engine, pytest.mark.quant]
LAYERS = 30  # every layer of SmolLM2-135M: a prompt's step is then all-W8A8
KV_BLOCKS = 220  # the twins (about 103 MiB in fp32's engine) come out of these at level 0
SHORT = "def fibonacci(n):"  # one request alone: every step under 128 tokens
LONG = [[(17 * i + 5 + 31 * salt) % 5000 + 100 for i in range(160)] for salt in range(3)]  # one 480-token step
DECODE = 24


@pytest.fixture(scope="module")
def engine(model_dir, tiered_pack):
    skip_unless_w8a8_runs_in("float32")
    llm, core = morph_llm(model_dir, tiered_pack, "pack", dtype="float32", max_model_len=512,
                          kv_cache_memory_bytes=KV_BLOCKS * kv_block_bytes(model_dir, "float32"),
                          morph={"tiers": ["w8a8"], "prompt_twin_layers": LAYERS})
    yield llm, core
    del llm


def test_prompts_compute_as_static_w8a8_and_decodes_as_plain_fp32(engine, model_dir, tiered_pack, tmp_path):
    llm, _ = engine
    ours_short = greedy_tokens(llm, [SHORT], DECODE)
    ours_long = greedy_tokens(llm, LONG, 1)  # the prompt's step only
    ours_nll, tokens = score_windows(llm, LONG)  # the prompts' own log-likelihood: one 480-token step
    plain, static = plain_vllm_many(model_dir, [
        plain_job([SHORT], DECODE, windows=LONG, dtype="float32", max_model_len=512),
        plain_job(LONG, 1, windows=LONG, dtype="float32", max_model_len=512, model=str(static_w8a8_dir(tiered_pack)))],
        tmp_path)
    assert ours_short == plain["token_ids"]
    assert ours_long == static["token_ids"]
    assert tokens == static["tokens"] and ours_nll == pytest.approx(static["nll"], rel=1e-5)
    assert abs(plain["nll"] - static["nll"]) > 1e-3 * static["nll"]  # so the two are told apart


def test_a_round_trip_installs_the_held_twins_and_keeps_them_and_the_budget_holds_them_below_the_top(engine):
    llm, core = engine
    layers, controller = layer_set_of(core), controller_of(core)
    linears = layers.all_linears()
    held = [s.prompt_twin[1] for s in linears]
    twin_bytes = layers.prompt_twin_bytes()
    assert len(held) == 4 * LAYERS and twin_bytes == sum(t.nbytes for t in held) > 0
    budget = controller.budget
    assert controller.prompt_twin_bytes == twin_bytes
    assert budget.weight_bytes(0) == controller.rank_weight_bytes + twin_bytes
    at_top = controller.rank_weight_bytes - sum(s.fp_bytes for s in linears) + sum(t.nbytes for t in held)
    assert budget.weight_bytes(budget.max_level) == at_top  # the twins are what the top computes with
    before = greedy_tokens(llm, [SHORT], DECODE)

    assert core.morphserve_set_level(LAYERS)["quantized_layers"] == LAYERS
    assert all(isinstance(s.compute, HeldTwin) and s.compute.twin is t for s, t in zip(linears, held))
    assert layers.live_bytes() == twin_bytes
    assert core.morphserve_set_level(0)["changed"]
    assert [s.prompt_twin[1] for s in linears] == held
    assert all(isinstance(s.kernels.forward_of(s.layer), SplitForward) for s in linears)
    assert layers.live_bytes() == sum(s.fp_bytes for s in linears) + twin_bytes
    assert greedy_tokens(llm, [SHORT], DECODE) == before


def test_the_server_counts_which_tokens_its_twins_computed(engine):
    """The exact quality charge: a step of prompt size is the twins', a decode step is not.
    Three 160-token prompts share one 480-token step (their prompts and first tokens are the
    twins'); their other tokens come from 3-token decode steps, in full precision."""
    llm, core = engine
    controller = controller_of(core)
    assert controller.moves.level == 0
    before = controller.state(memory=False)["served_tokens"]
    greedy_tokens(llm, LONG, DECODE)
    after = controller.state(memory=False)["served_tokens"]
    assert after["twin_min_tokens"] == 128

    def delta(part: str) -> int:
        return sum(after[part].values()) - sum(before[part].values())

    assert delta("through_twins") == 3 * 160 + 3
    assert delta("by_level") == 3 * 160 + 3 * DECODE
    assert set(after["by_level"]) == {"0"}  # served at level 0 throughout
