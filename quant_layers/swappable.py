"""A vLLM linear layer that can switch between full precision and its W4A16 twin in place.

On CPU, vLLM's `UnquantizedLinearMethod` prepacks the bf16 weight into `layer.cpu_linear`
(a closure over a oneDNN handle) and empties `layer.weight`; `apply()` then calls
`layer.cpu_linear(x, weight, bias)` on every forward. A swap therefore replaces that
closure:

- quantize: install a closure over vLLM's own mixed-precision kernel (chosen by
  `choose_mp_linear_kernel`, CPUWNA16 here) and drop the prepacked bf16 handle, which
  frees its memory;
- restore: read the bf16 master from the model's own safetensors file (a read-only map,
  see `mapped_checkpoint`), let vLLM prepack it with `dispatch_cpu_unquantized_gemm`, and
  install the new closure; the fused master is a transient buffer.

The twin's kernel tensors are likewise built from the pack file at quantize time, so the
only weights held in anonymous memory are the ones the model computes with.

Both states use vLLM's kernels; no GEMM is written here. Every vLLM symbol used is
imported through `morphserve.vllm.patches` so the coupling surface stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphserve.vllm import patches as vp
from quant_layers.mapped_checkpoint import CheckpointReader


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


def process_for_kernel(shards: list[PackedShard], in_features: int, group_size: int,
                       dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """Run vLLM's own W4A16 weight processing on one fused linear's pack tensors; return
    what the kernel computes with (see kernel_twins: this runs once, at start-up)."""
    packed = torch.cat([s.weight_packed for s in shards], 0)
    scale = torch.cat([s.weight_scale for s in shards], 0).to(dtype)
    kernel = vp.make_wna16_kernel(in_features, packed.shape[0], group_size, dtype)
    holder = torch.nn.Module()
    holder.bias = None
    # Plain Parameters carrying vLLM's dim attributes are all the kernel reads; vLLM's
    # own fused loaders produce the same row-wise concatenation of q/k/v (gate/up).
    holder.weight_packed = _param(packed, input_dim=1, output_dim=0, packed_dim=1)
    holder.weight_scale = _param(scale, input_dim=1, output_dim=0)
    kernel.process_weights_after_loading(holder)
    return vp.wna16_kernel_state(holder)


class W4Compute:
    """The live W4A16 compute path of one fused linear: its own copy of the kernel-layout
    tensors (anonymous memory, counted as weights) and vLLM's kernel."""

    def __init__(self, kernel, tensors: dict[str, torch.Tensor], attrs: dict):
        holder = torch.nn.Module()
        holder.bias = None
        for name, t in tensors.items():
            setattr(holder, name, torch.nn.Parameter(t, requires_grad=False))
        for name, value in attrs.items():
            setattr(holder, name, value)
        self.kernel = kernel
        self.holder = holder
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(self.holder, x, bias)


class IdentityCompute:
    """A 'twin' that computes exactly what full precision computes (a fresh bf16 prepack).

    A testing aid: swapping to it exercises the whole swap path while the output must
    stay bit-identical to plain vLLM.
    """

    def __init__(self, master: torch.Tensor):
        self.nbytes = master.numel() * master.element_size()
        self.cpu_linear = prepack_full(master)

    def __call__(self, x, weight, bias):
        return self.cpu_linear(x, weight, bias)


def prepack_full(master: torch.Tensor):
    """vLLM's bf16 prepack of `master` [out, in] into a standalone closure.

    The closure owns vLLM's packed copy (a oneDNN handle, or the sgl packed weight) and
    ignores the `weight` argument, so it can be built off to the side and installed as a
    layer's `cpu_linear` later; `master` is not referenced afterwards and can be freed.
    """
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(master, requires_grad=False)
    holder.bias = None
    vp.prepack_unquantized(holder)
    return holder.cpu_linear


@dataclass(frozen=True)
class Readers:
    """The open file maps of one transition: bf16 masters (the model) and W4 twins (the pack)."""

    masters: CheckpointReader
    twins: CheckpointReader


class W4Twin:
    """Builds the live W4A16 compute of one fused linear from the kernel-layout twin file."""

    def __init__(self, name: str, in_features: int, out_features: int, group_size: int, dtype: torch.dtype,
                 attrs: dict):
        self.name = name  # the fused linear's key prefix in the twin file
        self.kernel = vp.make_wna16_kernel(in_features, out_features, group_size, dtype)
        self.params = attrs["params"]
        self.attrs = {k: v for k, v in attrs.items() if k != "params"}

    def build(self, keys: list[str], readers: Readers) -> W4Compute:
        tensors = {p: readers.twins.get(f"{self.name}.{p}").clone() for p in self.params}
        return W4Compute(self.kernel, tensors, self.attrs)


class IdentityTwin:
    def build(self, keys: list[str], readers: Readers) -> IdentityCompute:
        return IdentityCompute(readers.masters.fused([f"{k}.weight" for k in keys]))


class SwappableLinear:
    """Switches one vLLM linear module between its bf16 prepack and a compute twin.

    Neither precision is held anywhere but in the layer: the bf16 master is re-read from
    the model's safetensors file on restore, the twin from the pack's file on quantize.
    """

    def __init__(self, layer: torch.nn.Module, keys: list[str], twin, fp_bytes: int):
        if not hasattr(layer, "cpu_linear"):
            raise RuntimeError("MorphServe swapping supports vLLM's CPU linear path only (layer has no cpu_linear)")
        self.layer = layer
        self.keys = keys  # the HF linears fused into this vLLM module, in vLLM's order
        self.twin = twin
        self.fp_bytes = fp_bytes
        self.compute = None  # the live twin while quantized
        self.quantized = False

    @property
    def live_bytes(self) -> int:
        return self.compute.nbytes if self.quantized else self.fp_bytes

    def to_quantized(self, readers: Readers) -> None:
        if self.quantized:
            return
        compute = self.twin.build(self.keys, readers)
        # Dropping the old closure releases vLLM's prepacked bf16 copy.
        self.layer.cpu_linear = compute
        self.compute = compute
        self.quantized = True

    def to_full(self, readers: Readers) -> None:
        if not self.quantized:
            return
        self.commit_full(self.prepare_full(readers))

    def prepare_full(self, readers: Readers):
        """Read and fuse the master from the file map and prepack it; the layer is untouched."""
        return prepack_full(readers.masters.fused([f"{k}.weight" for k in self.keys]))

    def commit_full(self, cpu_linear) -> None:
        self.layer.cpu_linear = cpu_linear
        self.compute = None  # the twin's tensors go with it
        self.quantized = False
