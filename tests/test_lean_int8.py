"""The lean int8 call computes exactly what vLLM's own apply_weights computes (the same ops,
the same arguments, bound once), and frees the kernel's native handle without the cyclic GC.
Real vLLM kernels on this CPU; no engine."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from morphserve.vllm.kernels import LeanInt8Kernel, make_int8_kernel
from quant_layers.swappable import W8Compute


def _vllm_holder(kernel, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    holder = torch.nn.Module()
    holder.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
    holder.logical_widths = [weight.shape[0]]
    holder.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    holder.weight_scale = torch.nn.Parameter(scale.clone(), requires_grad=False)
    for name in ("input_scale", "input_zero_point", "azp_adj"):
        holder.register_parameter(name, None)
    kernel.process_weights_after_loading(holder)
    return holder


@pytest.mark.parametrize("n, k", [(96, 64), (64, 160)])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_lean_call_is_bit_identical_to_vllms_apply_weights(n, k, shape, with_bias):
    from morphserve.vllm.platform_facts import kernel_paths

    if "sgl" in kernel_paths(n, k).w8a8 and (len(shape) > 1 or with_bias):
        # vLLM's sgl int8 path (AMX) takes 2-D activations only and its bias from the layer
        # (`bias_fp32`, made at load), not the call; MorphServe's twins serve the Llama
        # family's bias-free linears on 2-D activations, which the other cases cover.
        pytest.skip("vLLM's sgl int8 path: 2-D activations and a layer-held bias only")
    gen = torch.Generator().manual_seed(n * k + len(shape))
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, 1, generator=gen) * 0.02 + 0.001
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16) if with_bias else None
    x = torch.randn(*shape, k, generator=gen).to(torch.bfloat16)

    vllm_kernel = make_int8_kernel().kernel  # vLLM's own object, processed and called as vLLM does
    expected = vllm_kernel.apply_weights(_vllm_holder(vllm_kernel, weight, scale, bias), x, bias)

    compute = W8Compute(make_int8_kernel(), weight.clone(), scale.clone(), [n])
    assert isinstance(compute.kernel, LeanInt8Kernel) and compute.kernel.lean, "this CPU's int8 path is not covered"
    got = compute(x, torch.empty(0), bias)
    assert got.shape == expected.shape == (*shape, n)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_a_compiled_slot_calls_the_twins_bound_call_and_drops_it_when_replaced():
    """A compiled slot calls a W8A8 twin's bound int8 call directly (two Python frames fewer a
    linear), bit for bit what the twin's own call computes, and once the slot holds another
    forward nothing of the old twin is left there: its release frees the handle at once."""
    from morphserve.vllm import compiled_slots

    class Layer(torch.nn.Module):
        def __init__(self, forward):
            super().__init__()
            self.cpu_linear, self.output_size_per_partition = forward, 64

    gen = torch.Generator().manual_seed(7)
    weight = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=gen)
    compute = W8Compute(make_int8_kernel(), weight, torch.rand(64, 1, generator=gen) * 0.01 + 0.001, [64])
    layer = Layer(lambda x, w, b: torch.zeros(x.shape[0], 64, dtype=x.dtype))
    compiled_slots.route(layer)
    compiled_slots.install(layer, compute)
    slot = layer._morphserve_slot
    assert compiled_slots._CALLS[slot] is compute.kernel.call  # no frames between the op and the kernel
    for rows in (1, 7):
        x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
        got = torch.ops.morphserve.slot_linear(x, None, slot, 64)
        assert torch.equal(got, compute(x, torch.empty(0), None))
    owner = weakref.ref(compute.kernel.call)
    compiled_slots.install(layer, lambda x, w, b: x[:, :64] * 2)  # what a restore does
    x = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    assert torch.equal(torch.ops.morphserve.slot_linear(x, None, slot, 64), x[:, :64] * 2)
    gc.disable()
    try:
        compute.release()
        assert owner() is None
    finally:
        gc.enable()


def test_release_frees_the_native_handle_without_the_cyclic_gc():
    compute = W8Compute(make_int8_kernel(), torch.ones(64, 64, dtype=torch.int8), torch.full((64, 1), 0.01), [64])
    closure = compute.kernel.call
    owner = weakref.ref(closure)  # the closure owns vLLM's handler (or the sgl packed weight via the holder)
    del closure
    gc.disable()
    try:
        compute.release()
        assert owner() is None
        assert compute.kernel.call is None
    finally:
        gc.enable()


@pytest.mark.parametrize("static, symmetric", [(True, True), (False, False)])
def test_an_uncovered_configuration_is_left_to_vllms_apply_weights(static, symmetric):
    """MorphServe's twins are dynamic symmetric; any other activation scheme gets no lean call."""
    from morphserve.vllm.kernels import lean_int8_call

    inner = make_int8_kernel(static_input=static, symmetric=symmetric).kernel
    assert lean_int8_call(inner, torch.nn.Module()) is None
