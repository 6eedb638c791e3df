"""The bf16 forward a swap installs or removes owns its weight, on every path vLLM's CPU
dispatch takes: a oneDNN handle or sgl's packed copy (AVX-512, AMX), or torch's own linear,
which reads the `weight` argument itself (AVX2: oneDNN has no bf16 matmul there, so vLLM
falls back to it). Real vLLM dispatch code, no engine: seconds."""

from __future__ import annotations

import pytest
import torch

from morphserve.vllm import kernels

OUT, IN = 96, 64


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


@pytest.fixture
def master() -> torch.Tensor:
    return (torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)


def test_a_prepacked_forward_ignores_its_weight_argument_on_this_cpus_path(master):
    forward = kernels.VllmCpuKernels().prepack_bf16(master)
    x = torch.randn(3, IN).to(torch.bfloat16)
    expected = forward(x, torch.empty(0, dtype=torch.bfloat16), None)
    assert expected.shape == (3, OUT) and torch.isfinite(expected).all()
    assert torch.equal(forward(x, None, None), expected)  # the proof call passes no weight
    assert torch.allclose(expected.float(), _reference(x, master).float(), atol=2e-2, rtol=2e-2)


def _fallback_layer(master: torch.Tensor, monkeypatch) -> torch.nn.Module:
    """A linear as vLLM leaves it where oneDNN refuses bf16: its own dispatch, oneDNN off."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel, dispatch_cpu_unquantized_gemm

    if check_cpu_sgl_kernel(OUT, IN, torch.bfloat16):
        pytest.skip("this CPU takes vLLM's sgl (AMX) path before the oneDNN one: no torch fallback here")
    monkeypatch.setattr(ops, "_supports_onednn", False)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(master.clone(), requires_grad=False)
    layer.bias = None
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == OUT * IN, "vLLM's fallback keeps computing on layer.weight"
    return layer


def test_adopting_vllms_torch_fallback_binds_the_weight_and_empties_the_parameter(master, monkeypatch):
    layer = _fallback_layer(master, monkeypatch)
    x = torch.randn(2, IN).to(torch.bfloat16)
    before = layer.cpu_linear(x, layer.weight, None)
    kernels.VllmCpuKernels().adopt(layer)
    assert layer.weight.numel() == 0  # the forward is the weight's only holder: a swap frees it
    assert torch.equal(layer.cpu_linear(x, layer.weight, None), before)
    assert torch.equal(layer.cpu_linear(x, None, None), before)


def test_on_the_torch_fallback_a_restore_copies_the_master_and_binds_the_copy(master, monkeypatch):
    _fallback_layer(master, monkeypatch)  # oneDNN off for this test
    kernels.bf16_dispatch_path.cache_clear()
    try:
        assert not kernels.bf16_prepack_copies(OUT, IN, torch.bfloat16)
        assert kernels.bf16_dispatch_path(OUT, IN, torch.bfloat16) == "torch"  # no re-dispatch on a restore
        mapped = master.clone()  # stands in for the read-only file map a restore reads
        forward = kernels.VllmCpuKernels().prepack_bf16(mapped)
        x = torch.randn(2, IN).to(torch.bfloat16)
        expected = _reference(x, master)
        mapped.zero_()  # the forward holds its own copy, not the map
        assert torch.equal(forward(x, None, None), expected)
    finally:
        kernels.bf16_dispatch_path.cache_clear()
