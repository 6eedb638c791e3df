"""The real W4 twin swapped into a live engine: fidelity against static W4 serving, and memory."""

from __future__ import annotations

import json
import time

import pytest

from morphserve.vllm.offline_engine import worker_call
from tests.engine_utils import PROMPTS, morph_llm, plain_vllm, score_windows

pytestmark = [pytest.mark.engine, pytest.mark.quant]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def engine(model_dir, pack_dir, fast_dtype):
    """In the CPU's fastest dtype: this module's subject (the twin against static serving of
    it, the bytes a swap frees) does not depend on it, and in emulated bf16 it took 3.3 of a
    2-vCPU AVX2 EPYC's suite minutes. bf16 swaps stay covered by test_swap_identity."""
    # Workers trim every 0.5 s here (the default is 5 s), so the trimmer's test sees several intervals in seconds.
    llm, core = morph_llm(model_dir, pack_dir, "pack", dtype=fast_dtype, morph={"heap_trim_interval_s": 0.5})
    yield llm, core
    del llm


def _windows(pack_dir, model_dir):
    from transformers import AutoTokenizer

    from quant_layers.eval_windows import load_windows

    q = json.loads((pack_dir / "quality.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    return load_windows(q["eval_text"], tok, q["window"], q["tokens"]).windows


def _base_tier(pack_dir) -> tuple[str, str]:
    """The session pack's tier (W4A16, or W8A8 where this CPU has no W4A16 kernel) and its folder."""
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    return manifest.get("base_tier", "w4a16"), manifest["quantized_dir"]


# Bytes of one layer's twin per bf16 byte of that layer, whatever the engine's dtype: int4 +
# bf16 scales per 64 weights; int8 + fp32 scales per row.
TWIN_FRACTION = {"w4a16": (0.2, 0.35), "w8a8": (0.45, 0.6)}


def test_all_layers_swapped_match_static_serving_of_the_twin(engine, model_dir, pack_dir, tmp_path, fast_dtype):
    from vllm import SamplingParams

    llm, core = engine
    windows = _windows(pack_dir, model_dir)
    assert core.morphserve_set_level(30)["quantized_layers"] == 30
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    ours = [list(o.outputs[0].token_ids) for o in outs]
    nll, count = score_windows(llm, windows)
    core.morphserve_set_level(0)
    static = plain_vllm(pack_dir / _base_tier(pack_dir)[1], PROMPTS, MAX_TOKENS, tmp_path, windows=windows,
                        dtype=fast_dtype)
    assert ours == static["token_ids"]
    assert count == static["tokens"]
    assert nll / count == pytest.approx(static["nll"] / static["tokens"], rel=1e-3)


def test_restoring_returns_full_precision_outputs(engine, model_dir):
    from vllm import SamplingParams

    llm, core = engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    core.morphserve_set_level(0)
    fp = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    core.morphserve_set_level(30)
    q = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    core.morphserve_set_level(0)
    back = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert back == fp
    assert q != fp  # the twin really computes something else on this 135M model


def _rss(core) -> int:
    return worker_call(core, "morphserve_rss")


def test_bytes_freed_per_layer_are_full_precision_minus_the_twin_and_come_back(engine, pack_dir, fast_dtype):
    """No master or idle twin is resident: quantizing a layer frees its full-precision prepack
    and allocates only its own twin tensors, so RSS drops by exactly the net bytes."""
    _, core = engine
    low, high = TWIN_FRACTION[_base_tier(pack_dir)[0]]
    core.morphserve_set_level(0)
    bf16_bytes = 7_077_888  # SmolLM2 decoder linears in bf16
    layer_bytes = bf16_bytes * (2 if fast_dtype == "float32" else 1)
    before = _rss(core)
    t = core.morphserve_set_level(1)["transition"]
    assert t["fp_bytes_freed"] == layer_bytes
    w4 = layer_bytes - t["bytes_freed"]
    assert low * bf16_bytes < w4 < high * bf16_bytes
    assert t["rss_delta"] == pytest.approx(t["bytes_freed"], rel=0.15)
    t = core.morphserve_set_level(10)["transition"]
    assert t["fp_bytes_freed"] == 9 * layer_bytes
    assert t["rss_delta"] == pytest.approx(t["bytes_freed"], rel=0.10)
    assert before - _rss(core) == pytest.approx(10 * (layer_bytes - w4), rel=0.10)
    t = core.morphserve_set_level(0)["transition"]
    assert t["fp_bytes_freed"] == -10 * layer_bytes
    assert _rss(core) == pytest.approx(before, rel=0.01)


def test_memory_state_holds_the_budget_equation(engine):
    _, core = engine
    core.morphserve_set_level(0)
    file_before = core.morphserve_state()["memory"]["rss_file_bytes"]
    for level in (0, 15, 30):
        core.morphserve_set_level(level)
        mem = core.morphserve_state()["memory"]
        assert mem["twin_bytes"] == 0
        assert mem["accounted_bytes"] == mem["weights_bytes"] + mem["twin_bytes"] + mem["kv_bytes"]
        assert mem["within_budget"], mem
        assert mem["rss_anon_bytes"] > 0 and mem["rss_file_bytes"] > 0
    core.morphserve_set_level(0)
    # No view of the model or pack file outlives a transition: their pages leave RSS.
    assert core.morphserve_state()["memory"]["rss_file_bytes"] - file_before < 20 * 2**20


def _anon(core) -> int:
    return worker_call(core, "morphserve_memory")["rss_anon_bytes"]


def test_twenty_round_trips_do_not_leak(engine):
    """20 rather than 100 round trips (1.5 s each on a 2-vCPU AVX2 EPYC), to keep `make test`
    within its time: leaking even one layer's weights (7 MB in bf16) per round trip would pass
    the 1% bound (about 15 MB) within a handful."""
    _, core = engine
    core.morphserve_set_level(0)
    for _ in range(3):  # warm up allocator pools
        core.morphserve_set_level(30)
        core.morphserve_set_level(0)
    start, start_anon = _rss(core), _anon(core)
    for _ in range(20):
        assert core.morphserve_set_level(30)["quantized_layers"] == 30
        assert core.morphserve_set_level(0)["quantized_layers"] == 0
    growth = _rss(core) / start - 1
    assert growth < 0.01, f"RSS grew {growth:.2%} over 20 round trips"
    anon_growth = _anon(core) / start_anon - 1
    assert anon_growth < 0.01, f"anonymous memory grew {anon_growth:.2%} over 20 round trips"


def test_each_worker_trims_its_heap_between_steps(engine):
    """The heap trimmer in the live worker (every 0.5 s in this module, no growth margin, at step
    boundaries): the engine core asks for a trim once the interval has passed while steps
    run, and an idle engine is not trimmed again. The memory reading says so, which is what
    `state` and /metrics show."""
    from vllm import SamplingParams

    llm, core = engine
    first = worker_call(core, "morphserve_memory")["heap_trim"]
    assert first["running"] and first["interval_s"] == 0.5 and first["min_growth_bytes"] == 0
    assert first["mode"] == "boundary"
    time.sleep(1.1)  # idle: no step, so nothing is owed
    assert worker_call(core, "morphserve_memory")["heap_trim"]["calls"] == first["calls"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    generated = 0
    while time.monotonic() - t0 < 1.6:  # steps spanning three intervals
        generated += len(llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids)
    later = worker_call(core, "morphserve_memory")["heap_trim"]
    assert generated > 0
    assert later["calls"] >= first["calls"] + 2 and later["skipped"] == 0
