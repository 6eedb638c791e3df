"""`prompt_twin_layers: auto` in a real engine (fp32, the pack served W8A8-only): the engine
core reads this machine's kernel profile through rank 0 before any twin is built, holds the
twins the rule chooses from it (every layer, or none, by CPU kind), reports the count and the
reason in the state, and the policy's step model reuses the same reading."""

from __future__ import annotations

import pytest

from morphserve.harness.kv_shape import kv_block_bytes
from morphserve.runtime.prompt_twin_choice import choose_prompt_twins
from morphserve.vllm.offline_engine import controller_of, layer_set_of
from tests.engine_utils import morph_llm, skip_unless_w8a8_runs_in

pytestmark = [pytest.mark.engine, pytest.mark.quant]
KV_BLOCKS = 220  # room for every layer's twin (about 103 MiB in fp32's engine) at level 0


@pytest.fixture(scope="module")
def engine(model_dir, tiered_pack):
    skip_unless_w8a8_runs_in("float32")
    llm, core = morph_llm(model_dir, tiered_pack, "pack", dtype="float32", max_model_len=512,
                          kv_cache_memory_bytes=KV_BLOCKS * kv_block_bytes(model_dir, "float32"),
                          morph={"tiers": ["w8a8"], "prompt_twin_layers": "auto", "policy": "default"})
    yield llm, core
    del llm


def test_auto_holds_what_the_rule_chooses_from_this_machines_profile_and_says_why(engine):
    _, core = engine
    controller, layers = controller_of(core), layer_set_of(core)
    seconds, dtype = controller.start_profile  # read through rank 0 before morphserve_init
    assert dtype == "float32" and {"bf16", "w8a8"} <= set(seconds)
    choice = choose_prompt_twins(seconds, len(layers.layers), ["w8a8"])
    state = core.morphserve_state()
    assert state["prompt_twin_layers"] == controller.config.prompt_twin_layers == choice.layers
    assert state["prompt_twins_auto"] == choice.why
    twinned = {i for i, linears in layers.layers.items() if all(s.prompt_twin is not None for s in linears)}
    untwinned = {i for i, linears in layers.layers.items() if all(s.prompt_twin is None for s in linears)}
    assert len(twinned) == choice.layers and len(twinned) + len(untwinned) == len(layers.layers)
    assert (layers.prompt_twin_bytes() > 0) == (choice.layers > 0) == (controller.prompt_twin_bytes > 0)
    # the policy's step model was seeded from the same reading (no second timing)
    assert controller.kernel_profile_dtype == "float32"
