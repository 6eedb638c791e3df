"""vLLM's CUDA linear kernels as a MorphServe backend would use them (vLLM 0.32.0).

UNVERIFIED: no line of `VllmCudaKernels` has run on a GPU (docs/CUDA.md says what is
missing). What is verified, on CPU, against vLLM's real classes, is `predict_w4a16_kernel`:
which mixed-precision kernel vLLM's own `choose_mp_linear_kernel` picks for a 4-bit layer
on a given compute capability (tests/test_backends.py).

On CUDA, vLLM's linear layers compute through `layer.quant_method.apply(layer, x, bias)`;
there is no `cpu_linear` closure. The slot a swap replaces is therefore `quant_method`:
the W4 compute is vLLM's chosen kernel (Machete on Hopper, Marlin elsewhere, after its
`process_weights_after_loading` repack), the bf16 compute a plain GEMM over the master on
the device. CUDA graphs keep the addresses they captured, so the backend runs eager only.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import namedtuple

import torch



def w4a16_config(in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
    """vLLM's description of one symmetric 4-bit linear (the pack's twin)."""
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    return MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features), partition_weight_shape=(in_features, out_features),
        weight_type=scalar_types.uint4b8, act_type=dtype, group_size=group_size, zero_points=False)


class _CudaPlatformView:
    """What the CUDA kernels' `can_implement` asks of `current_platform`, for one capability."""

    def __init__(self, capability: int):
        from vllm.platforms import PlatformEnum

        self.capability = capability
        self._enum = PlatformEnum.CUDA

    def is_cuda(self) -> bool:
        return True

    def is_cuda_alike(self) -> bool:
        return True

    def is_rocm(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return False

    def is_device_capability(self, capability: int) -> bool:
        return self.capability == capability

    def has_device_capability(self, capability: int) -> bool:
        return self.capability >= capability

    def get_device_capability(self, device_id: int = 0):
        return namedtuple("DeviceCapability", "major minor")(self.capability // 10, self.capability % 10)


@contextlib.contextmanager
def _as_cuda(capability: int):
    """Let vLLM's kernel choice see a CUDA device of this capability: each module that
    reads `current_platform` gets the view, and its own object back afterwards."""
    from vllm.model_executor.kernels import linear

    modules = [linear] + [importlib.import_module(k.__module__) for k in _cuda_kernels()]
    saved = [(m, m.__dict__.get("current_platform")) for m in modules]
    view = _CudaPlatformView(capability)
    try:
        for m, _ in saved:
            m.current_platform = view
        yield
    finally:
        for m, original in saved:
            if original is not None:
                m.current_platform = original


def _cuda_kernels() -> list:
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    return list(_POSSIBLE_KERNELS[PlatformEnum.CUDA])


def predict_w4a16_kernel(in_features: int, out_features: int, group_size: int, dtype: torch.dtype,
                         capability: int) -> str:
    """The kernel class vLLM's `choose_mp_linear_kernel` picks for this layer on a CUDA
    device of `capability` (e.g. 90 for H100, 80 for A100), by running vLLM's own choice.
    Kernels whose optional packages are missing here (Conch, Humming) are skipped by vLLM
    as on a GPU host without them."""
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

    config = w4a16_config(in_features, out_features, group_size, dtype)
    with _as_cuda(capability):
        return choose_mp_linear_kernel(config, compute_capability=capability).__name__


class _ForwardMethod:
    """Stands in for a layer's quant_method: vLLM's LinearBase.forward calls
    `quant_method.apply(layer, x, bias)`."""

    def __init__(self, forward):
        self.forward = forward

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, None, bias)


class VllmCudaKernels:
    """quant_layers.swappable.LinearKernels over vLLM's CUDA path. UNVERIFIED (see above)."""

    def __init__(self, device: str = "cuda"):
        self.device = torch.device(device)

    def make_w4(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

        config = w4a16_config(in_features, out_features, group_size, dtype)
        kernel_cls = choose_mp_linear_kernel(config)
        return kernel_cls(config, w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                          w_zp_param_name="weight_zero_point")

    def w8_bytes(self, out_features: int, in_features: int) -> int:
        return out_features * (in_features + 4)  # int8 weights, fp32 scales (unverified on CUDA)

    def w4_state(self, holder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """Marlin and Machete leave workspaces and permuted scales as parameters or plain
        attributes; every tensor attribute is kept, moved to the host for the cache file."""
        tensors = {name: p.data.cpu() for name, p in holder.named_parameters(recurse=False)}
        tensors.update({name: v.cpu() for name, v in vars(holder).items()
                        if isinstance(v, torch.Tensor) and name not in tensors})
        return tensors, {}

    def prepack_bf16(self, master: torch.Tensor):
        weight = master.to(self.device, non_blocking=True)

        def forward(x, _weight, bias):
            return torch.nn.functional.linear(x, weight, bias)

        return forward

    def place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def has_slot(self, layer: torch.nn.Module) -> bool:
        return hasattr(layer, "quant_method")

    def adopt(self, layer: torch.nn.Module) -> None:
        """Nothing yet: the loaded `layer.weight` stays on the layer after a swap (unverified
        backend; freeing it needs the quant_method swap to bind it, as the CPU side does)."""

    def install(self, layer: torch.nn.Module, forward) -> None:
        layer.quant_method = _ForwardMethod(forward)

    def forward_of(self, layer: torch.nn.Module):
        """The forward `layer` computes with now: an installed one, or its own quant_method's."""
        method = layer.quant_method
        if isinstance(method, _ForwardMethod):
            return method.forward
        return lambda x, weight, bias: method.apply(layer, x, bias)
