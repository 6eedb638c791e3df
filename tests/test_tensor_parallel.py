"""MorphServe under vLLM's tensor parallelism: every rank swaps its own shard of the same
layers in one plan, which commits on all ranks or on none.

SmolLM2-135M has 9 attention heads and 3 KV heads, so vLLM serves it at a tensor-parallel
size of 1, 3 or 9 only (vLLM itself refuses 2); these tests run 3 ranks on this machine's
cores (MorphServe supplies the CPU lists vLLM's automatic binding cannot make on one NUMA
node). The baselines are plain vLLM at the same size, serving the static checkpoint of
each rung, in a process of their own.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from morphserve.vllm.offline_engine import controller_of, run_greedy, shut_down, worker_calls
from tests.conftest import tier_verdicts
from tests.engine_utils import PROMPTS, morph_llm, plain_vllm_many, plain_job

pytestmark = [pytest.mark.engine, pytest.mark.quant]
TP = 3
MAX_TOKENS = 12
L = 30
BUDGET_GB = 0.5  # the engine's total; each rank gets a third
# Rank 1 fails in the middle of its first quantize (ranks 0 and 2 complete it), and again
# right after installing the first layer of its first background-restore commit.
FAULT = "quantize@1,restore_commit@1"


@pytest.fixture(scope="module")
def rungs_pack(request, pack_dir):
    """The tiered pack where this CPU runs W4A16 (levels 0, L, 2L), else the session's
    W8A8-only pack (levels 0 and L)."""
    return request.getfixturevalue("tiered_pack") if tier_verdicts()["w4a16"] is None else pack_dir


def _rung_checkpoints(pack) -> dict[int, str]:
    """level -> the static checkpoint plain vLLM serves for it: k*L, every layer in the
    pack's k-th tier."""
    manifest = json.loads((pack / "manifest.json").read_text())
    return {k * L: str(pack / t["quantized_dir"]) for k, t in enumerate(manifest["tiers"], start=1)}


@pytest.fixture(scope="module")
def static_runs(model_dir, rungs_pack, tmp_path_factory):
    """Plain vLLM at the same size on each rung's static checkpoint, started in a thread
    before the engine under test so the two start-ups overlap (one process each; outputs
    do not depend on timing: every request is added before the first step)."""
    jobs = [_plain_job(m) for m in _rung_checkpoints(rungs_pack).values()]
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(plain_vllm_many, model_dir, jobs, tmp_path_factory.mktemp("plain-tp"))


@pytest.fixture(scope="module")
def engine(model_dir, rungs_pack, static_runs):
    saved = {k: os.environ.get(k) for k in ("MORPHSERVE_TEST_FAULTS", "VLLM_CPU_OMP_THREADS_BIND")}
    os.environ["MORPHSERVE_TEST_FAULTS"] = FAULT  # the workers read it; they are spawned now
    try:
        llm, core = morph_llm(model_dir, rungs_pack, "pack", tensor_parallel_size=TP,
                              morph={"memory_budget_gb": BUDGET_GB})
    finally:  # the binding MorphServe supplied must not reach the single-rank engines of other modules
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    yield llm, core
    shut_down(llm)  # its 3 worker processes, now rather than at interpreter exit
    del llm


def _greedy(llm) -> list[list[int]]:
    run = run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, MAX_TOKENS)
    return [run.tokens[str(i)] for i in range(len(PROMPTS))]


def _maps(core) -> list[dict]:
    return worker_calls(core, "morphserve_tiers")


def test_a_fault_on_one_rank_rolls_every_rank_back_and_serving_goes_on(engine):
    llm, core = engine
    before = _greedy(llm)
    result = core.morphserve_set_level(L)
    assert not result["ok"] and "rank 1" in result["error"] and "injected fault at quantize" in result["error"], result
    assert result["level"] == 0
    assert _maps(core) == [{}] * TP  # ranks 0 and 2 had finished the plan: both undone
    state = core.morphserve_state()
    assert state["memory"]["split_layers"] == [] and state["kv_capacity_blocks"] == state["kv_blocks_by_level"][0]
    assert _greedy(llm) == before  # every rank computes in bf16 again, exactly as before
    core.morphserve_set_level(None)  # the error pin; the fault fires once per worker process


def _plain_job(model: str) -> dict:
    return plain_job(PROMPTS, MAX_TOKENS, tensor_parallel_size=TP, model=model)


def test_each_rung_computes_what_plain_vllm_tp_computes_from_that_static_checkpoint(engine, rungs_pack, static_runs):
    """Level L (every layer W8A8) and 2L (every layer W4A16, where this CPU runs it) against
    plain vLLM serving that static checkpoint at the same size; level 0 against itself
    after the round trip (bit-exact restores on every rank)."""
    llm, core = engine
    ours = {0: _greedy(llm)}
    for level in _rung_checkpoints(rungs_pack):
        result = core.morphserve_set_level(level)
        assert result["ok"] and result["level"] == level, result
        maps = _maps(core)
        assert all(m == maps[0] for m in maps) and len(maps[0]) == L
        ours[level] = _greedy(llm)
    assert core.morphserve_set_level(0)["ok"]
    assert _greedy(llm) == ours[0]
    for level, theirs in zip(_rung_checkpoints(rungs_pack), static_runs.result()):
        assert ours[level] == theirs["token_ids"], f"level {level}"


def test_kv_capacity_per_rank_equals_the_single_rank_table_at_the_same_budget(engine, rungs_pack, model_dir):
    """The budget equation per rank: a third of the budget, of the weights, of each rung's
    saving and of each KV block, so the same block count as one rank with all of it."""
    from kv_resize.budget import KVBudget
    from morphserve.harness.kv_shape import kv_block_bytes
    from morphserve.offline import pack as packfmt
    from morphserve.offline.ladder import Ladder
    from morphserve.runtime.kv_sizing import model_weight_bytes
    from morphserve.vllm.kernels import int8_held_bytes
    from quant_layers.model_info import read_model_info

    _, core = engine
    state = core.morphserve_state()
    manifest = packfmt.load_manifest(rungs_pack)
    shapes = read_model_info(model_dir).linear_shapes
    held = {"w8a8": [sum(int8_held_bytes(*shapes[n]) for n in shapes)] * manifest.num_layers}
    one_rank = KVBudget(int(BUDGET_GB * 2**30), model_weight_bytes(model_dir),
                        tuple(Ladder.from_manifest(manifest, held=held).savings), kv_block_bytes(model_dir, "bfloat16"))
    table = [one_rank.usable_blocks(k) for k in range(one_rank.max_level + 1)]
    assert state["tensor_parallel_size"] == TP and state["memory_budget_total_bytes"] == TP * state[
        "memory_budget_bytes"]
    assert len(state["kv_blocks_by_level"]) == len(table)
    assert all(abs(a - b) <= 1 for a, b in zip(state["kv_blocks_by_level"], table)), (state["kv_blocks_by_level"],
                                                                                       table)
    memory = state["memory"]
    assert len(memory["per_rank"]) == TP and memory["within_budget"]
    assert memory["total"]["budget_bytes"] == state["memory_budget_total_bytes"]


def test_a_background_restore_installs_the_same_layers_on_every_rank_at_each_boundary(engine):
    """Ranks prepare bf16 layers at their own pace; a boundary installs only what all have.
    The first commit fails on rank 1 part-way (it installed fewer layers than the others):
    every rank is brought back to one map, serving goes on, and a second restore completes."""
    llm, core = engine
    controller = controller_of(core)
    errors = controller.errors
    assert core.morphserve_set_level(L)["ok"]
    core.morphserve_set_level(None)

    def check(_: int = 0) -> None:
        maps = _maps(core)
        assert all(m == maps[0] for m in maps), maps

    def finish_restore() -> None:
        for _ in range(600):  # idle boundaries finish what is left
            if controller.moves.restoring is None:
                return
            time.sleep(0.05)
            controller.on_step_boundary()
            check()

    for attempt in range(2):
        controller.moves.to(0, reason="test", background=True)
        run = run_greedy(llm, {f"{attempt}-{i}": p for i, p in enumerate(PROMPTS)}, 24, check)
        finish_restore()
        assert len(run.tokens) == len(PROMPTS)
        if attempt == 0:  # the injected failure, recovered at its boundary
            assert controller.errors == errors + 1 and "rank 1" in controller.last_error["error"], controller.last_error
            assert controller.moves.restoring is None and controller.pinned_by_error
            core.morphserve_set_level(None)
    assert controller.moves.restoring is None and _maps(core) == [{}] * TP
