"""A vLLM linear layer that can switch between full precision and its W4A16 twin in place.

On CPU, vLLM's `UnquantizedLinearMethod` prepacks the bf16 weight into `layer.cpu_linear`
(a closure over a oneDNN handle) and empties `layer.weight`; `apply()` then calls
`layer.cpu_linear(x, weight, bias)` on every forward. A swap therefore replaces that
closure:

- quantize: install a closure over vLLM's own mixed-precision kernel (chosen by
  `choose_mp_linear_kernel`, CPUWNA16 here) and drop the prepacked bf16 handle, which
  frees its memory;
- restore: put the bf16 master copy (kept outside the layer) back in `layer.weight` and
  let vLLM prepack it again with `dispatch_cpu_unquantized_gemm`.

Both states use vLLM's kernels; no GEMM is written here. Every vLLM symbol used is
imported through `morphserve.vllm_patches` so the coupling surface stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphserve import vllm_patches as vp


@dataclass
class PackedShard:
    """One HF linear's compressed-tensors tensors (weight_packed [out, in/8], weight_scale [out, in/g])."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor


def _param(t: torch.Tensor, **attrs) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t.contiguous(), requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


class W4Compute:
    """The W4A16 compute path of one fused linear, prepared once at startup."""

    def __init__(self, shards: list[PackedShard], in_features: int, group_size: int, dtype: torch.dtype):
        packed = torch.cat([s.weight_packed for s in shards], 0)
        scale = torch.cat([s.weight_scale for s in shards], 0).to(dtype)
        out_features = packed.shape[0]
        self.kernel = vp.make_wna16_kernel(in_features, out_features, group_size, dtype)
        holder = torch.nn.Module()
        holder.bias = None
        # Plain Parameters carrying vLLM's dim attributes are all the kernel reads; vLLM's
        # own fused loaders produce the same row-wise concatenation of q/k/v (gate/up).
        holder.weight_packed = _param(packed, input_dim=1, output_dim=0, packed_dim=1)
        holder.weight_scale = _param(scale, input_dim=1, output_dim=0)
        self.kernel.process_weights_after_loading(holder)
        self.holder = holder
        self.nbytes = sum(t.numel() * t.element_size() for t in holder.parameters())

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(self.holder, x, bias)


class IdentityCompute:
    """A 'twin' that computes exactly what full precision computes (a fresh bf16 prepack).

    A testing aid: swapping to it exercises the whole swap path while the output must
    stay bit-identical to plain vLLM.
    """

    def __init__(self, master: torch.Tensor):
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(master.clone(), requires_grad=False)
        holder.bias = None
        vp.prepack_unquantized(holder)
        self.holder = holder
        self.nbytes = master.numel() * master.element_size()

    def __call__(self, x, weight, bias):
        return self.holder.cpu_linear(x, self.holder.weight, bias)


class SwappableLinear:
    """Switches one vLLM linear module between its bf16 prepack and a compute twin."""

    def __init__(self, layer: torch.nn.Module, master: torch.Tensor, twin):
        if not hasattr(layer, "cpu_linear"):
            raise RuntimeError("MorphServe swapping supports vLLM's CPU linear path only (layer has no cpu_linear)")
        self.layer = layer
        self.master = master  # bf16 [out, in], host memory, outside the layer
        self.twin = twin
        self.quantized = False

    @property
    def fp_bytes(self) -> int:
        return self.master.numel() * self.master.element_size()

    def to_quantized(self) -> None:
        if self.quantized:
            return
        # Dropping the old closure releases vLLM's prepacked bf16 copy.
        self.layer.cpu_linear = self.twin
        self.quantized = True

    def to_full(self) -> None:
        if not self.quantized:
            return
        self.layer.weight = torch.nn.Parameter(self.master, requires_grad=False)
        vp.prepack_unquantized(self.layer)  # empties layer.weight again, as vLLM does
        self.quantized = False
