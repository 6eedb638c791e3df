"""The offline switchable model on the real SmolLM2 and its real W4 twin."""

from __future__ import annotations

import pytest
import torch

from quant_layers import twin
from quant_layers.layer_runner import SwitchableModel, mean_cosine
from quant_layers.model_info import read_model_info

pytestmark = pytest.mark.quant


@pytest.fixture(scope="module")
def switchable(model_dir, w4_pack_dir):
    info = read_model_info(model_dir)
    tw = twin.open_twin(w4_pack_dir / "quantized", info)
    return SwitchableModel(model_dir, lambda i: tw.dequantized_layer(i, torch.bfloat16), info.num_layers)


def test_layer_by_layer_equals_transformers_forward(switchable):
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    inputs = switchable.layer_inputs(ids)
    with torch.inference_mode():
        reference = switchable.model.model(input_ids=ids).last_hidden_state
    assert torch.equal(switchable.final(inputs[-1]), reference)
    assert torch.equal(switchable.run_from(17, inputs[17]), reference)


def test_quantize_and_restore_round_trip_is_exact(switchable):
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    before = switchable.run_from(0, switchable.embed(ids))
    switchable.set_quantized({3, 14, 25})
    changed = switchable.run_from(0, switchable.embed(ids))
    switchable.set_quantized(())
    after = switchable.run_from(0, switchable.embed(ids))
    assert not torch.equal(before, changed)
    assert 0.9 < mean_cosine(before, changed) < 1.0
    assert torch.equal(before, after)


def test_dequantized_twin_is_close_to_the_original_weights(model_dir, w4_pack_dir):
    from safetensors import safe_open

    info = read_model_info(model_dir)
    tw = twin.open_twin(w4_pack_dir / "quantized", info)
    dense = tw.dequantized_layer(5, torch.float32)["mlp.up_proj"]
    with safe_open(info.weight_files[0], "pt") as f:
        original = f.get_tensor("model.layers.5.mlp.up_proj.weight").float()
    assert dense.shape == original.shape
    err = (dense - original).norm() / original.norm()
    assert 0.01 < err < 0.2  # really quantized, and really the same weights
