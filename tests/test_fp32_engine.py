"""MorphServe on an fp32 engine (`--dtype float32`, the fast dtype where bf16 is emulated):
swaps are exact, a W8A8 layer computes what static W8A8 serving computes in fp32, and the
capacity a quantize gives is counted from fp32 bytes, not the manifest's bf16 ones.

Run on every CPU kind, so the fp32 path is checked where the suite's other engines run bf16.
"""

from __future__ import annotations

import json

import pytest

from morphserve.harness.kv_shape import kv_block_bytes
from tests.engine_utils import PROMPTS, morph_llm, plain_job, plain_vllm_many, skip_unless_w8a8_runs_in

pytestmark = [pytest.mark.engine, pytest.mark.quant]
MAX_TOKENS = 24
KV_BLOCKS = 12


def _greedy(llm) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _w8_dir(pack) -> str:
    manifest = json.loads((pack / "manifest.json").read_text())
    return next(t["quantized_dir"] for t in manifest.get("tiers", []) if t["name"] == "w8a8")


@pytest.fixture(scope="module")
def engine(model_dir, tiered_pack):
    """The tiered pack served W8A8-only: the tier every CPU's vLLM build runs."""
    skip_unless_w8a8_runs_in("float32")
    llm, core = morph_llm(model_dir, tiered_pack, "pack", dtype="float32", max_model_len=512,
                          kv_cache_memory_bytes=KV_BLOCKS * kv_block_bytes(model_dir, "float32"),
                          morph={"tiers": ["w8a8"]})
    yield llm, core
    del llm


def test_all_w8a8_in_fp32_matches_static_w8a8_in_fp32_and_restores_exactly(engine, tiered_pack, model_dir, tmp_path):
    llm, core = engine
    full = _greedy(llm)
    assert core.morphserve_set_level(30)["quantized_layers"] == 30
    ours = _greedy(llm)
    assert core.morphserve_set_level(0)["changed"]
    back = _greedy(llm)
    # Both baselines in one process (one vLLM import: 15 s of a 2-vCPU AVX2 EPYC's core).
    static, plain = (r["token_ids"] for r in plain_vllm_many(model_dir, [
        plain_job(PROMPTS, MAX_TOKENS, dtype="float32", max_model_len=512, model=str(tiered_pack / _w8_dir(tiered_pack))),
        plain_job(PROMPTS, MAX_TOKENS, dtype="float32", max_model_len=512)], tmp_path))
    assert ours == static and ours != full
    assert full == back == plain


def test_quantizing_frees_fp32_bytes(engine, model_dir):
    """A W8A8 layer frees about 3 of every 4 fp32 weight bytes (the int8 weight, a scale per
    row and the kernel's fp32 buffer per column stay); counted from the manifest's bf16 bytes it
    would be about 1 of 2, and the top level would hold a third of the blocks it really frees."""
    _, core = engine
    blocks = core.morphserve_state()["kv_blocks_by_level"]
    assert blocks[0] == KV_BLOCKS - 1  # vLLM's null block
    block = kv_block_bytes(model_dir, "float32")
    freed = (blocks[-1] - blocks[0]) * block
    c = json.loads((model_dir / "config.json").read_text())
    h, f, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    params = c["num_hidden_layers"] * (h * (h + 2 * kv) + h * h + 2 * h * f + f * h)
    assert 2.7 * params <= freed + block and freed <= 3.05 * params, (freed, params)
