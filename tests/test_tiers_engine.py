"""A tiered pack (W8A8 + W4A16) served by the real engine: the all-W8A8 rung computes what
plain vLLM computes from the static W8A8 checkpoint, every rung is accounted in memory, and
going back down is bit-exact."""

from __future__ import annotations

import json

import pytest

from morphserve.vllm.offline_engine import worker_call
from tests.conftest import tier_verdicts  # noqa: F401  (read by the skipif condition)
from tests.engine_utils import PROMPTS, morph_llm, plain_vllm, score_windows

# A string condition: pytest evaluates it at set-up, before the session's tiered pack is built.
# The AVX2 build has no W4A16 kernel; its W8A8 rungs are tested on the session pack there.
pytestmark = [pytest.mark.engine, pytest.mark.quant,
              pytest.mark.skipif("tier_verdicts()['w4a16'] is not None",
                                 reason="needs vLLM's W4A16 kernel, which this CPU's vLLM build lacks")]
MAX_TOKENS = 32
L = 30
LAYER_BF16 = 7_077_888  # SmolLM2 decoder linears in bf16


@pytest.fixture(scope="module")
def engine(model_dir, tiered_pack):
    llm, core = morph_llm(model_dir, tiered_pack, "pack")
    yield llm, core
    del llm


def _generate(llm):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_the_pack_records_both_tiers_and_the_ladder(tiered_pack):
    manifest = json.loads((tiered_pack / "manifest.json").read_text())
    (tier,) = manifest["tiers"]
    assert tier["name"] == "w8a8" and tier["swap_order"] == manifest["swap_order"]
    # int8 weights + fp32 per-channel scales: a little over half of bf16
    assert all(0.5 * LAYER_BF16 < b < 0.52 * LAYER_BF16 for b in tier["layer_bytes"])
    quality = json.loads((tiered_pack / "quality.json").read_text())
    assert sorted(map(int, quality["ladder"]["ppl"])) == list(range(2 * L + 1))
    assert quality["ladder"]["ppl"][str(2 * L)] == pytest.approx(quality["all_quantized_ppl"], rel=1e-6)
    assert quality["tiers"]["w8a8"]["ppl"][str(L)] == quality["ladder"]["ppl"][str(L)]
    # the W4A16-only curve is measured where it is read: the baselines' checkpoints, the check's point
    k = quality["ladder"]["check"]["w4a16_layers_freeing_as_much"]
    assert sorted(map(int, quality["orders"]["lis"]["ppl"])) == sorted({0, 7, 15, 22, L, k})


def test_all_w8a8_matches_static_w8a8_serving(engine, tiered_pack, tmp_path):
    llm, core = engine
    q = json.loads((tiered_pack / "quality.json").read_text())
    from transformers import AutoTokenizer

    from quant_layers.eval_windows import load_windows

    windows = load_windows(q["eval_text"], AutoTokenizer.from_pretrained(json.loads(
        (tiered_pack / "manifest.json").read_text())["model_path"]), q["window"], q["tokens"]).windows
    state = core.morphserve_set_level(L)
    assert state["quantized_layers"] == L and state["tier_counts"] == {"w8a8": L}
    ours = _generate(llm)
    nll, count = score_windows(llm, windows)
    core.morphserve_set_level(0)
    static = plain_vllm(tiered_pack / "quantized-w8a8", PROMPTS, MAX_TOKENS, tmp_path, windows=windows)
    assert ours == static["token_ids"]
    assert count == static["tokens"]
    assert nll / count == pytest.approx(static["nll"] / static["tokens"], rel=1e-3)


def test_every_tier_restores_bit_exact(engine):
    llm, core = engine
    core.morphserve_set_level(0)
    fp = _generate(llm)
    core.morphserve_set_level(L)
    w8 = _generate(llm)
    assert core.morphserve_set_level(2 * L)["tier_counts"] == {"w4a16": L}  # W8A8 -> W4A16 for every layer
    w4 = _generate(llm)
    assert core.morphserve_set_level(L)["tier_counts"] == {"w8a8": L}  # and back to W8A8
    assert _generate(llm) == w8
    core.morphserve_set_level(0)
    assert _generate(llm) == fp
    assert w8 != w4


def test_a_background_compression_builds_the_same_w8a8_layers(engine):
    """bf16 -> all-W8A8 built in a worker thread while requests decode (compress_mode
    background), installed at step boundaries: every int8 compute passes its proof on the
    engine's thread and the rung then generates what the synchronous move's rung does."""
    from morphserve.vllm.offline_engine import controller_of, run_greedy

    llm, core = engine
    controller = controller_of(core)
    core.morphserve_set_level(L)
    w8 = _generate(llm)
    core.morphserve_set_level(0)
    core.morphserve_set_level(None)  # as a policy-driven move runs

    def compress_at_step_2(steps: int) -> None:
        if steps == 2:
            assert controller.moves.to(L, reason="test", background_compress=True)["compressing"]
            assert core.morphserve_state()["memory"]["within_budget"]

    run_greedy(llm, {f"w8bg{i}": p for i, p in enumerate(PROMPTS)}, 48, compress_at_step_2)
    assert controller.errors == 0 and controller.moves.restoring is None
    assert controller.moves.tier_counts() == {"w8a8": L} and controller.pool.limit == controller.capacity(L)
    assert controller.recorder.recent[-1]["mode"] == "background"
    assert _generate(llm) == w8
    core.morphserve_set_level(0)


def _rss(core) -> int:
    return worker_call(core, "morphserve_rss")


# What each tier should hold per layer, from the model's shapes alone (not from MorphServe's
# own accounting): int8 weights + one fp32 scale per output row; int4 weights + one bf16
# scale per group of 64 inputs. 3,538,944 weights per layer over 7 linears (q, k, v, o, gate,
# up, down): 576 x (576 + 192 + 192) + 576 x 576 + 576 x 1536 x 2 + 1536 x 576.
LAYER_WEIGHTS = LAYER_BF16 // 2
ROWS = 576 + 192 + 192 + 576 + 1536 + 1536 + 576
W8_LAYER = LAYER_WEIGHTS + 4 * ROWS
W4_LAYER = LAYER_WEIGHTS // 2 + 2 * (LAYER_WEIGHTS // 64)


def test_each_rung_frees_its_bytes_and_they_come_back(engine):
    """Measured RSS of the worker, rung by rung, against the bytes the shapes say each tier
    holds (15%: the allocator's and oneDNN's own buffers)."""
    _, core = engine
    # Once up and down the ladder first: memory the engine freed earlier (its start-up, for
    # one, builds the kernel-layout twins in this process) can sit in the heap between the
    # buffers the rungs allocate and come back with a later rung's trim (a fresh clone
    # measured W8A8 -> W4A16 freeing 87 MB against the shapes' 50 MB, once; not reproduced).
    core.morphserve_set_level(2 * L)
    core.morphserve_set_level(0)
    before = _rss(core)
    t = core.morphserve_set_level(5)["transition"]  # five layers bf16 -> W8A8
    after_w8 = _rss(core)
    assert t["fp_bytes_freed"] == 5 * LAYER_BF16
    assert before - after_w8 == pytest.approx(5 * (LAYER_BF16 - W8_LAYER), rel=0.15)
    core.morphserve_set_level(L)  # every layer W8A8
    all_w8 = _rss(core)
    assert before - all_w8 == pytest.approx(L * (LAYER_BF16 - W8_LAYER), rel=0.15)
    t = core.morphserve_set_level(2 * L)["transition"]  # every layer W8A8 -> W4A16
    all_w4 = _rss(core)
    assert all_w8 - all_w4 == pytest.approx(L * (W8_LAYER - W4_LAYER), rel=0.15)
    mem = core.morphserve_state()["memory"]
    assert mem["accounted_bytes"] == mem["weights_bytes"] + mem["twin_bytes"] + mem["kv_bytes"]
    assert mem["within_budget"], mem
    core.morphserve_set_level(0)
    assert _rss(core) == pytest.approx(before, rel=0.01)
