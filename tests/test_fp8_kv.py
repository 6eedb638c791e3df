"""An FP8 KV cache under MorphServe: where vLLM's CPU attention supports it (x86 with
AVX-512 or AMX), the same KV bytes hold twice the blocks at every level, transitions grow
and shrink the pool in those blocks, and output stays right; where vLLM refuses it,
MorphServe refuses it in one line before any engine starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.engine_utils import morph_llm

HEAD_SIZE = 64  # SmolLM2


def _fp8_problem() -> str | None:
    from morphserve.vllm.platform_facts import fp8_kv_problem

    return fp8_kv_problem(HEAD_SIZE)


def test_where_vllm_refuses_fp8_kv_morphserve_refuses_it_in_one_line(monkeypatch):
    from morphserve.errors import MorphServeError
    from morphserve.vllm import patches, platform_facts

    monkeypatch.setattr(platform_facts, "fp8_kv_problem", lambda head, dtype=None: "no AVX-512 here")
    config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="fp8"),
                             model_config=SimpleNamespace(get_head_size=lambda: HEAD_SIZE, dtype=None))
    with pytest.raises(MorphServeError, match=r"--kv-cache-dtype fp8: .*no AVX-512 here"):
        patches.refuse_unsupported_kv_dtype(config)
    config.cache_config.cache_dtype = "auto"
    patches.refuse_unsupported_kv_dtype(config)  # the model's dtype: nothing to check


@pytest.mark.engine
@pytest.mark.quant
@pytest.mark.skipif("_fp8_problem() is not None", reason="vLLM's CPU attention has no FP8 KV on this CPU")
def test_fp8_kv_doubles_the_blocks_of_every_level_and_transitions_still_serve(model_dir, pack_dir, block_bytes,
                                                                              tmp_path, monkeypatch):
    from vllm import SamplingParams

    from morphserve.vllm.perplexity import perplexity_by_level

    llm, core = morph_llm(model_dir, pack_dir, "pack", kv_cache_memory_bytes=10 * block_bytes, max_model_len=1024,
                          max_num_seqs=8, kv_cache_dtype="fp8")
    try:
        state = core.morphserve_state()
        by_level = state["kv_blocks_by_level"]
        # bf16 blocks at this budget: 10 minus vLLM's null block; FP8 blocks are half the bytes
        assert 2 * 9 <= by_level[0] <= 2 * 10
        top = state["max_level"]
        params = SamplingParams(max_tokens=8, temperature=0.0)
        for level in (top, 0):
            assert core.morphserve_set_level(level)["ok"]
            assert core.morphserve_state()["kv_capacity_blocks"] == by_level[level]
            [out] = llm.generate(["The capital of France is"], params, use_tqdm=False)
            assert "Paris" in out.outputs[0].text
        # what the evaluation uses to charge an FP8 cache's own cost: vLLM's perplexity by level
        ppl = perplexity_by_level(llm, _eval_window(model_dir, pack_dir), [0, top])
        assert all(1.0 < p < 1000.0 for p in ppl.values()) and ppl[top] != ppl[0], ppl
        assert core.morphserve_state()["level"] == top
        # where the cache's cost is measured for this pack and CPU kind, the policy reads it
        from morphserve.offline import kv_cost
        from morphserve.vllm.offline_engine import controller_of

        monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))
        controller = controller_of(core)
        assert "kv_cost" not in controller.served_quality()  # not measured: weights only
        kv_cost.save(pack_dir, "fp8", controller.ladder.tier_names,
                     {"top": top, "factor": {"0": 1.03, str(top): 1.05}})
        charged = controller.served_quality()["kv_cost"]
        assert charged["dtype"] == "fp8" and charged["factor_by_level"]["0"] == pytest.approx(1.03)
        assert charged["factor_by_level"][str(top)] == pytest.approx(1.05)
    finally:
        del llm


def _eval_window(model_dir, pack_dir) -> list[list[int]]:
    """The first of the pack's own evaluation windows (real text)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from quant_layers.eval_windows import load_windows

    quality = json.loads((pack_dir / "quality.json").read_text())
    windows = load_windows(Path(quality["eval_text"]), AutoTokenizer.from_pretrained(str(model_dir)),
                           quality["window"], quality["tokens"]).windows
    return windows[:1]
