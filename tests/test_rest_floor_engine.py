"""A floor in a real engine (fp32, W8A8-only, 20 prompt twins): a KV budget whose level 0
holds less than one max_model_len request once the twins are resident. The server starts
on the first rung that pays for them (its layers on their held twins, nothing built), a
max_model_len request is served there, the memory equation holds, a manual level below
the floor is refused and a round trip to the top comes back to the floor with every twin."""

from __future__ import annotations

import pytest

from morphserve.harness.kv_shape import kv_block_bytes
from morphserve.runtime.kv_sizing import rest_floor
from morphserve.vllm.offline_engine import controller_of, layer_set_of
from quant_layers.swappable import HeldTwin, SplitForward
from tests.engine_utils import greedy_tokens, morph_llm, skip_unless_w8a8_runs_in

pytestmark = [pytest.mark.engine, pytest.mark.quant]
TWINS = 20
KV_BLOCKS = 14  # the 20 twins (about 69 MiB in fp32's engine, 12 blocks) leave level 0 one usable block
MAX_LEN = 512  # four 128-token blocks


@pytest.fixture(scope="module")
def engine(model_dir, tiered_pack):
    skip_unless_w8a8_runs_in("float32")
    llm, core = morph_llm(model_dir, tiered_pack, "pack", dtype="float32", max_model_len=MAX_LEN,
                          kv_cache_memory_bytes=KV_BLOCKS * kv_block_bytes(model_dir, "float32"),
                          morph={"tiers": ["w8a8"], "prompt_twin_layers": TWINS})
    yield llm, core
    del llm


def test_the_server_starts_at_its_floor_on_held_twins_and_serves_a_max_model_len_request(engine):
    llm, core = engine
    controller, layers = controller_of(core), layer_set_of(core)
    block_tokens = controller.scheduler.block_size
    caps = [controller.capacity(k) for k in range(controller.num_layers + 1)]
    floor = controller.floor
    assert 0 < floor < TWINS and floor == rest_floor(caps, block_tokens, MAX_LEN, TWINS)
    assert caps[0] * block_tokens < MAX_LEN <= caps[floor] * block_tokens
    assert controller.moves.level == floor and controller.pool.visible == caps[floor]
    state = controller.state(memory=False)
    assert state["floor"] == floor and state["level"] == floor

    order, by_layer = controller.order, layers.layers
    assert all(isinstance(s.compute, HeldTwin) for i in order[:floor] for s in by_layer[i])
    assert all(isinstance(s.kernels.forward_of(s.layer), SplitForward) for i in order[floor:TWINS] for s in by_layer[i])
    assert all(s.prompt_twin is None for i in order[TWINS:] for s in by_layer[i])

    prompt = [(13 * i + 7) % 5000 + 100 for i in range(MAX_LEN - 8)]
    assert len(greedy_tokens(llm, [prompt], 8)[0]) == 8  # the whole context fits the floor's KV
    memory = controller.memory_state()
    assert memory["within_budget"], memory


def test_no_level_below_the_floor_and_a_round_trip_comes_back_to_it_with_every_twin(engine):
    llm, core = engine
    controller, layers = controller_of(core), layer_set_of(core)
    floor, top = controller.floor, controller.num_layers
    held = [s.prompt_twin for s in layers.all_linears()]
    refused = core.morphserve_set_level(floor - 1)
    assert refused["status"] == 400 and f"in {floor}..{top}" in refused["error"]
    assert controller.moves.level == floor
    before = greedy_tokens(llm, ["def fibonacci(n):"], 16)
    assert core.morphserve_set_level(top)["quantized_layers"] == top
    assert core.morphserve_set_level(floor)["quantized_layers"] == floor
    assert [s.prompt_twin for s in layers.all_linears()] == held
    assert greedy_tokens(llm, ["def fibonacci(n):"], 16) == before
    assert core.morphserve_set_level(None)["ok"]


def test_a_floor_that_would_quantize_every_twin_is_refused_by_serve_in_one_line(model_dir, tiered_pack):
    """Refused in the engine core (where the KV is sized), told by `morphserve serve` as one
    `error:` line and exit status 2: one twin on a budget whose level 0 holds exactly one
    max_model_len request, so only level 1 (the twinned layer quantized) holds it again."""
    skip_unless_w8a8_runs_in("float32")
    import os
    import subprocess
    import sys

    from morphserve.harness.servers import free_port
    from morphserve.runtime.kv_sizing import model_weight_bytes
    from tests.conftest import REPO

    kv = 9 * kv_block_bytes(model_dir, "float32")  # 8 usable blocks of 128 tokens and vLLM's null block
    budget_gb = (model_weight_bytes(model_dir, "float32") + kv) / 2**30
    proc = subprocess.run(
        [sys.executable, "-m", "morphserve.cli", "serve", str(model_dir), "--pack", str(tiered_pack), "--tiers", "w8a8",
         "--dtype", "float32", "--memory-budget-gb", repr(budget_gb), "--kv-cache-memory-bytes", str(kv),
         "--max-model-len", "1024", "--prompt-twin-layers", "1", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors and errors[-1].startswith("error: with 1 prompt twins resident the memory budget holds a "
                                            "max_model_len (1024) request only from level 1"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
