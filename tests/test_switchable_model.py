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


def test_perplexity_restarts_at_the_first_changed_layer_and_equals_a_full_forward(switchable):
    from quant_layers.eval_windows import Windows

    windows = Windows(torch.randint(0, 49152, (5, 48), generator=torch.Generator().manual_seed(2)).tolist())

    def full_forward() -> float:  # transformers' own forward, whole model, the same 4-window chunks
        total = 0.0
        with torch.inference_mode():
            for i in range(0, len(windows.windows), 4):
                ids = torch.tensor(windows.windows[i : i + 4])
                logits = switchable.model(input_ids=ids).logits[:, :-1].float()
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum").item()
        return total

    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(switchable.layers)]
    try:
        for config, first in [((), 0), ({20}, 20), ({7, 20}, 7), ({7, 20, 25}, 25), ({7, 25}, 20), ({7, 25}, 30)]:
            switchable.set_quantized(config)
            calls.clear()
            nll, count = switchable.nll(windows)
            assert min(calls, default=30) == first and len(calls) == 2 * (30 - first)  # two chunks
            calls.clear()
            assert nll == pytest.approx(full_forward(), rel=1e-6) and count == 5 * 47
    finally:
        for h in hooks:
            h.remove()
        switchable.set_quantized(())


def test_layer_inputs_rerun_only_from_the_changed_layer(switchable):
    """The greedy search's rounds reuse the last round's layer inputs below the added layer."""
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(3))
    switchable.set_quantized({4})
    known = switchable.layer_inputs(ids)
    switchable.set_quantized({4, 12})
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(switchable.layers)]
    try:
        reused = switchable.layer_inputs(ids, known=known, start=12)
    finally:
        for h in hooks:
            h.remove()
    fresh = switchable.layer_inputs(ids)
    switchable.set_quantized(())
    assert calls == list(range(12, 30))
    assert len(reused) == 31 and all(torch.equal(a, b) for a, b in zip(reused, fresh))
    assert not torch.equal(reused[-1], known[-1])


def test_activation_round_trip_once_per_shared_input_equals_once_per_linear(switchable):
    """q/k/v (and gate/up) share their input, so it is quantized once: the same numbers as
    quantizing it before every linear."""
    from quant_layers import layer_runner

    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(4))
    quantized: list[torch.Tensor] = []
    real = layer_runner.fake_quant_per_token_int8
    switchable.act_quant_tiers = frozenset({layer_runner.BASE})  # the W4 twin stands in for a W8A8 tier
    layer_runner.fake_quant_per_token_int8 = lambda x: quantized.append(x) or real(x)
    try:
        switchable.set_quantized({2, 9})
        once = switchable.run_from(0, switchable.embed(ids))
        switchable._fake_quant_once = layer_runner.fake_quant_per_token_int8  # every linear on its own
        each = switchable.run_from(0, switchable.embed(ids))
    finally:
        layer_runner.fake_quant_per_token_int8 = real
        del switchable._fake_quant_once
        switchable.set_quantized(())
        switchable.act_quant_tiers = frozenset()
    assert len(quantized) == 2 * 4 + 2 * 7  # once: 4 distinct inputs per layer; then 7
    assert torch.equal(once, each)
    assert not torch.equal(once, switchable.run_from(0, switchable.embed(ids)))
