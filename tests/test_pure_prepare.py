"""Pure pieces of `prepare`: group size choice, eval windows, quality checkpoints, manifest schema."""

import json

import pytest

from morphserve.errors import USER_ERRORS
from morphserve.offline.pack import LayerBytes, Manifest, load_manifest
from quant_layers.eval_windows import plan_windows
from quant_layers.model_info import check_group_size, default_group_size
from quant_layers.quality import checkpoints


def test_group_size_defaults_to_largest_divisor():
    assert default_group_size({576, 1536}) == 64  # SmolLM2
    assert default_group_size({4096, 11008}) == 128  # Llama-2-7B
    with pytest.raises(USER_ERRORS):
        default_group_size({100})


def test_group_size_128_is_refused_for_smollm2_with_a_hint():
    with pytest.raises(USER_ERRORS, match=r"576.*use 64"):
        check_group_size(128, {576, 1536})
    check_group_size(64, {576, 1536})


def test_windows_are_bounded_by_budget_and_text():
    assert plan_windows(10_000, 1024, 16_368) == [(i * 1024, (i + 1) * 1024) for i in range(9)]
    assert len(plan_windows(100_000, 1024, 16_368)) == 16  # 16 x 1023 = 16,368 scored tokens
    assert len(plan_windows(100_000, 1024, 1)) == 1
    with pytest.raises(USER_ERRORS):
        plan_windows(100, 1024, 4096)


def test_checkpoints_quarter_points():
    assert checkpoints(30) == [7, 15, 22, 30]
    assert checkpoints(32) == [8, 16, 24, 32]


def _manifest(**kw):
    base = dict(tool_version="0", model_path="/m", model_sha256="x", architecture="LlamaForCausalLM",
                num_layers=2, bits=4, group_size=64, quantization_source="gptq", swap_order=[1, 0],
                layer_bytes=[LayerBytes(layer=0, fp16=10, quantized=3), LayerBytes(layer=1, fp16=10, quantized=3)])
    base.update(kw)
    return Manifest(**base)


def test_manifest_rejects_an_order_that_is_not_a_permutation():
    _manifest()
    with pytest.raises(ValueError):
        _manifest(swap_order=[0, 0])


def test_load_manifest_gives_one_line_errors(tmp_path):
    with pytest.raises(USER_ERRORS, match="not a MorphServe pack"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"tool_version": "0"}))
    with pytest.raises(USER_ERRORS, match="invalid manifest"):
        load_manifest(tmp_path)
