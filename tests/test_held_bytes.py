"""A static W8A8 system's weights as its engine holds them (morphserve.evaluation.held_bytes):
int8 linears counted per fused kernel by the same figure MorphServe's budget charges its twins."""

from __future__ import annotations

from pathlib import Path

import pytest

from morphserve.evaluation.held_bytes import engine_weight_bytes, int8_linears
from morphserve.runtime.kv_sizing import model_weight_bytes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from morphserve.offline import pack as packfmt
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    root = tmp_path_factory.mktemp("held")
    model = make_model(root / "model")
    tiered = make_tiered_pack(root / "tiered", model)
    return model, tiered / packfmt.load_manifest(tiered).tiers[0].quantized_dir


def test_linears_are_fused_as_vllm_fuses_them_and_their_stored_bytes_counted(checkpoints):
    _, w8 = checkpoints  # 2 layers: q, k, v 64+32+32 x 64; o 64 x 64; gate, up 128 x 64 each; down 64 x 128
    stored, linears = int8_linears(w8)
    assert sorted(linears) == sorted([(128, 64), (64, 64), (256, 64), (64, 128)] * 2)
    int8 = sum(o * i for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)])
    scales = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # bf16, one per output row
    assert stored == 2 * (int8 + scales)
    assert int8_linears(w8, float_width=4)[0] == 2 * (int8 + 2 * scales)  # an fp32 engine's count of the scales


def test_engine_bytes_replace_each_int8_linear_with_what_its_kernel_holds(checkpoints):
    _, w8 = checkpoints
    for dtype in (None, "float32"):
        stored, linears = int8_linears(w8, 4 if dtype else None)
        base = model_weight_bytes(w8, dtype)
        assert engine_weight_bytes(w8, dtype, lambda o, i: o * i + 8 * o) == \
            base - stored + sum(o * i + 8 * o for o, i in linears)
    # the oneDNN kernel on SmolLM2's q/k/v: int8, fp32 scales and fp32 azp_adj, 0.9 MB over the file in all
    assert engine_weight_bytes(w8, None, lambda o, i: o * i + 8 * o) > model_weight_bytes(w8)


def test_a_model_without_int8_linears_is_counted_as_before(checkpoints):
    model, _ = checkpoints
    assert int8_linears(model) == (0, [])
    for dtype in (None, "float32"):
        assert engine_weight_bytes(Path(model), dtype, lambda o, i: 1 / 0) == model_weight_bytes(model, dtype)
