"""A vLLM linear layer that can switch between full precision and its W4A16 twin in place.

On CPU, vLLM's `UnquantizedLinearMethod` prepacks the bf16 weight into `layer.cpu_linear`
(a closure over a oneDNN handle) and empties `layer.weight`; `apply()` then calls
`layer.cpu_linear(x, weight, bias)` on every forward. A swap therefore replaces that
closure:

- quantize: install a closure over vLLM's own mixed-precision kernel (chosen by
  `choose_mp_linear_kernel`, CPUWNA16 here) and drop the prepacked bf16 handle, which
  frees its memory;
- restore: map the bf16 master (the model's own safetensors file for a single linear, the
  fused-master cache file for q/k/v and gate/up, see `fused_masters`; read-only maps, see
  `mapped_checkpoint`), let vLLM prepack it straight from the map with
  `dispatch_cpu_unquantized_gemm` (its oneDNN and sgl prepacks copy the weight into their
  own layout), and install the new closure: no anonymous copy of the master is made.

The twin's kernel tensors are likewise built from the pack file at quantize time, so the
only weights held in anonymous memory are the ones the model computes with.

Both states use the serving engine's kernels; no GEMM is written here. This room does not
import vLLM: the kernels and the layer's forward slot come in as `LinearKernels`, which
the vLLM boundary implements (morphserve.vllm.kernels.VllmCpuKernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from quant_layers.errors import QuantLayersError
from quant_layers.mapped_checkpoint import CheckpointReader

Forward = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class LinearKernels(Protocol):
    """What a serving engine lends a swappable linear: its kernels and its forward slot."""

    def make_w4(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
        """The engine's W4A16 kernel for this shape (process_weights_after_loading, apply_weights)."""

    def make_w8(self):
        """The engine's int8 W8A8 kernel (dynamic per-token activations), one per linear."""

    def w8_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes the engine's int8 kernel holds for one linear (weights, scales, its own buffers)."""

    def w4_state(self, holder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """A processed W4A16 holder as (tensors, plain attributes), to be stored in a file."""

    def prepack_bf16(self, master: torch.Tensor) -> Forward:
        """The engine's full-precision prepack of `master` [out, in] as a standalone forward."""

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """An own copy of `t` on the compute device (`t` may be a read-only file map)."""

    def own(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, already a fresh copy, on the compute device (no second copy where it is there)."""

    def has_slot(self, layer: torch.nn.Module) -> bool:
        """Whether `layer` computes through a replaceable forward closure."""

    def adopt(self, layer: torch.nn.Module) -> None:
        """Make `layer`'s loaded full-precision forward the only holder of its weight, so
        installing another forward frees it (called once, before the first swap)."""

    def install(self, layer: torch.nn.Module, forward: Forward) -> None:
        """Make `layer` compute with `forward` from its next call on."""

    def forward_of(self, layer: torch.nn.Module) -> Forward:
        """The forward `layer` computes with now."""


class Cutter(Protocol):
    """One fused linear's tensors as this rank holds them (the engine's own weight loader
    cuts them: morphserve.vllm.shards.RankCutter). With one rank a cut is the plain q/k/v
    (gate/up) row concatenation."""

    in_features: int  # this rank's input features
    out_features: int  # this rank's output rows
    widths: list[int]  # this rank's rows of each fused part

    def cut(self, parts: list[torch.Tensor], in_divisor: int | None = 1,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor of this rank's part of `parts` (see RankCutter.cut)."""


class WholeCutter:
    """The Cutter of an engine with one rank: parts concatenated row-wise (for tests and
    tools that have no engine layer at hand)."""

    def __init__(self, in_features: int, widths: list[int]):
        self.in_features, self.widths = in_features, list(widths)
        self.out_features = sum(widths)

    def cut(self, parts, in_divisor=1, dtype=None):
        out = torch.cat(parts, 0) if len(parts) > 1 else parts[0].clone()
        return out.to(dtype) if dtype is not None else out


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
                       dtype: torch.dtype, kernels: LinearKernels) -> tuple[dict[str, torch.Tensor], dict]:
    """Run vLLM's own W4A16 weight processing on one fused linear's pack tensors; return
    what the kernel computes with (see kernel_twins: this runs once, at start-up)."""
    packed = kernels.place(torch.cat([s.weight_packed for s in shards], 0))
    scale = kernels.place(torch.cat([s.weight_scale for s in shards], 0).to(dtype))
    kernel = kernels.make_w4(in_features, packed.shape[0], group_size, dtype)
    holder = torch.nn.Module()
    holder.bias = None
    # Plain Parameters carrying vLLM's dim attributes are all the kernel reads; vLLM's
    # own fused loaders produce the same row-wise concatenation of q/k/v (gate/up).
    holder.weight_packed = _param(packed, input_dim=1, output_dim=0, packed_dim=1)
    holder.weight_scale = _param(scale, input_dim=1, output_dim=0)
    kernel.process_weights_after_loading(holder)
    return kernels.w4_state(holder)


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


class W8Compute:
    """The live W8A8 compute of one fused linear: vLLM's int8 kernel over its own holder,
    processed exactly as vLLM processes a static W8A8 checkpoint's layer."""

    def __init__(self, kernel, weight: torch.Tensor, scale: torch.Tensor, logical_widths: list[int]):
        holder = torch.nn.Module()
        holder.bias = None
        holder.logical_widths = logical_widths
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        holder.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            holder.register_parameter(name, None)
        n, k = weight.shape
        kernel.process_weights_after_loading(holder)
        self.kernel = kernel
        self.holder = holder
        # The oneDNN path moves the weight into its handle (holder.weight becomes None).
        held = sum(p.numel() * p.element_size() for p in holder.parameters())
        self.nbytes = held if holder.weight is not None else held + n * k

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(self.holder, x, bias)

    @property
    def direct(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """`(x, bias) -> out`, for a compiled slot, which calls it for every linear of every
        step: the kernel's own bound call where it has one (the engine's lean int8 call),
        skipping this object's `__call__` and the kernel's `apply_weights` (two Python frames
        a linear). Taken at install; the slot drops it when the next compute is installed,
        before this one is released."""
        call = getattr(self.kernel, "call", None)
        if call is not None:
            return call
        kernel, holder = self.kernel, self.holder
        return lambda x, bias: kernel.apply_weights(holder, x, bias)

    def release(self) -> None:
        """Free the kernel's native state now. vLLM's CPU int8 kernel keeps a bound method of
        itself (a reference cycle), so dropping it leaves its oneDNN handle, weights included,
        to the cyclic GC, which runs rarely: measured, 30 W8A8 round trips grew RSS by 525 MiB
        on a CPU without AMX. Clearing its attributes breaks the cycle; the handle goes at once.
        A kernel with its own `release` (the engine's wrapper of vLLM's) does that itself."""
        release = getattr(self.kernel, "release", None)
        if release is not None:
            release()
        else:
            vars(self.kernel).clear()


class ProofFailed(QuantLayersError):
    """A twin's compute failed its one tiny call before being installed."""


def _no_fault(point: str) -> None:
    pass


def prove_compute(compute, in_features: int, out_features: int, dtype: torch.dtype,
                  fault: Callable[[str], None] = _no_fault) -> None:
    """Run `compute` once on a one-token input and check the shape and finiteness of what
    it returns: a kernel this CPU's vLLM build lacks, or one that computes garbage, fails
    here, before it is installed in a layer, instead of in the next forward (where it would
    kill the engine). One row costs microseconds against the milliseconds of a swap."""
    x = torch.linspace(-1.0, 1.0, in_features, dtype=torch.float32).to(dtype).unsqueeze(0)
    try:
        fault("proof")  # test-only fault injection, supplied by the runtime
        y = compute(x, None, None)
    except Exception as e:
        raise ProofFailed(f"{type(compute).__name__} failed its proof call: {type(e).__name__}: {e}") from e
    if tuple(y.shape) != (1, out_features):
        raise ProofFailed(f"{type(compute).__name__} returned shape {tuple(y.shape)}, expected (1, {out_features})")
    if not torch.isfinite(y).all():
        raise ProofFailed(f"{type(compute).__name__} returned non-finite values on its proof call")


class IdentityCompute:
    """A 'twin' that computes exactly what full precision computes (a fresh bf16 prepack).

    A testing aid: swapping to it exercises the whole swap path while the output must
    stay bit-identical to plain vLLM.
    """

    def __init__(self, master: torch.Tensor, kernels: LinearKernels):
        self.nbytes = master.numel() * master.element_size()
        self.forward = kernels.prepack_bf16(master)

    def __call__(self, x, weight, bias):
        return self.forward(x, weight, bias)


@dataclass(frozen=True)
class Readers:
    """The open file maps of one transition: bf16 masters (the model) and W4 twins (the pack)."""

    masters: CheckpointReader
    twins: CheckpointReader
    w8: CheckpointReader | None = None  # the pack's W8A8 checkpoint (a tiered pack only)
    fused: CheckpointReader | None = None  # fused bf16 masters (fused_masters), keyed by linear name


class W4Twin:
    """Builds the live W4A16 compute of one fused linear from the kernel-layout twin file."""

    def __init__(self, name: str, in_features: int, out_features: int, group_size: int, dtype: torch.dtype,
                 attrs: dict, kernels: LinearKernels):
        self.name = name  # the fused linear's key prefix in the twin file
        self.kernels = kernels
        self.kernel = kernels.make_w4(in_features, out_features, group_size, dtype)
        self.params = attrs["params"]
        self.attrs = {k: v for k, v in attrs.items() if k != "params"}

    def build(self, keys: list[str], readers: Readers) -> W4Compute:
        tensors = {p: self.kernels.place(readers.twins.get(f"{self.name}.{p}")) for p in self.params}
        return W4Compute(self.kernel, tensors, self.attrs)


class W8Twin:
    """Builds the live W8A8 compute of one fused linear from the pack's int8 checkpoint: this
    rank's q/k/v (gate/up) rows, cut and fused by vLLM's loader (one copy, the kernel's
    own), scales widened to fp32 as vLLM's ChannelQuantScaleParameter stores them."""

    def __init__(self, kernels: LinearKernels, cutter: Cutter):
        self.kernels = kernels
        self.cutter = cutter

    def build(self, keys: list[str], readers: Readers) -> W8Compute:
        weight = self.cutter.cut([readers.w8.get(f"{k}.weight") for k in keys])
        scale = self.cutter.cut([readers.w8.get(f"{k}.weight_scale") for k in keys], None, torch.float32)
        return W8Compute(self.kernels.make_w8(), self.kernels.own(weight), self.kernels.own(scale),
                         list(self.cutter.widths))


class IdentityTwin:
    def __init__(self, kernels: LinearKernels, cutter: Cutter, name: str | None = None):
        self.kernels = kernels
        self.cutter = cutter
        self.name = name  # the linear's key in the fused-master cache, which holds it in the engine's dtype

    def build(self, keys: list[str], readers: Readers) -> IdentityCompute:
        if readers.fused is not None and self.name is not None and readers.fused.has(f"{self.name}.weight"):
            weight = readers.fused.get(f"{self.name}.weight").clone()
        else:
            weight = self.cutter.cut([readers.masters.get(f"{k}.weight") for k in keys])
        return IdentityCompute(self.kernels.own(weight), self.kernels)


class HeldTwin:
    """A layer's resident prompt twin, handed out as its quantized compute: installing it
    builds nothing, and whoever drops it releases nothing (no `release`), since the layer
    keeps it for prompts when it returns to full precision."""

    def __init__(self, twin):
        self.twin = twin
        self.nbytes = twin.nbytes

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.twin(x, weight, bias)


class SplitForward:
    """Full precision for small calls, the prompt twin for large ones: vLLM flattens a step's
    tokens into one call, so a step of at least `min_tokens` tokens (a prompt's) runs the
    twin and a decode step full precision. Where int8 is slower than full precision for a
    few rows and faster for many (vLLM's int8 kernel quantizes each call's activations
    first, a fixed cost), this gives prompts int8's speed and decodes full precision's."""

    def __init__(self, full: Forward, twin, min_tokens: int):
        self.full, self.twin, self.min_tokens = full, twin, min_tokens

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] >= self.min_tokens:
            return self.twin(x, weight, bias)
        return self.full(x, weight, bias)


# How compressed each tier is (higher frees more); morphserve.offline.ladder.RANK agrees.
TIER_RANK = {"bf16": 0, "w8a8": 1, "w4a16": 2}


class SwappableLinear:
    """Switches one vLLM linear module between its bf16 prepack and a compute twin per tier.

    Neither precision is held anywhere but in the layer: the bf16 master is re-read from
    the model's safetensors file on restore, a twin from the pack's file on quantize.
    `twins` maps a tier name to its twin, least compressed first; `to_quantized` goes to
    the most compressed one.
    """

    FULL = "bf16"

    def __init__(self, layer: torch.nn.Module, keys: list[str], twins, fp_bytes: int, kernels: LinearKernels,
                 shape: tuple[int, int], dtype: torch.dtype, name: str | None = None):
        if not kernels.has_slot(layer):
            raise RuntimeError("MorphServe swapping supports vLLM's CPU linear path only (layer has no cpu_linear)")
        kernels.adopt(layer)
        self.kernels = kernels
        self.layer = layer
        self.keys = keys  # the HF linears fused into this vLLM module, in vLLM's order
        self.name = name  # its key in the fused-master cache file
        self.twins = twins if isinstance(twins, dict) else {"w4a16": twins}
        # By each tier's compression, not by the order the dict was filled in.
        self.most_compressed = max(self.twins, key=lambda t: TIER_RANK[t])
        self.fp_bytes = fp_bytes
        self.in_features, self.out_features = shape  # for the proof call before an install
        self.dtype = dtype
        self.fault: Callable[[str], None] = _no_fault  # the runtime's test-only fault injection
        self.tier_bytes = {self.FULL: fp_bytes}  # what a restore to each tier will hold
        self.compute = None  # the live twin while quantized
        self.tier = self.FULL
        self.prompt_twin: tuple[str, object] | None = None  # (tier, compute) held for prompts
        self.prompt_min_tokens = 0

    @property
    def quantized(self) -> bool:
        return self.tier != self.FULL

    @property
    def live_bytes(self) -> int:
        """What this linear holds now: at full precision, a resident prompt twin too."""
        return self.compute.nbytes if self.quantized else self.tier_bytes[self.FULL]

    @property
    def resident_twin_bytes(self) -> int:
        """Bytes of the prompt twin this linear holds at every tier (0 without one)."""
        return self.prompt_twin[1].nbytes if self.prompt_twin is not None else 0

    def hold_prompt_twin(self, tier: str, compute, min_tokens: int) -> None:
        """Keep `compute` (this linear's `tier` twin, built and proved) resident for good:
        while the layer is in full precision its calls of at least `min_tokens` tokens run
        through it; quantizing to `tier` installs it (nothing to build, nothing freed but the
        full-precision weight); restoring keeps it. Full precision's held bytes include it,
        so the budget and the ladder's savings account for it."""
        if self.quantized or self.prompt_twin is not None:
            raise QuantLayersError("a prompt twin is held once, by a layer in full precision")
        if tier not in self.twins:
            raise QuantLayersError(f"tier {tier} is not served here (served: {', '.join(self.twins)})")
        self.prompt_twin = (tier, compute)
        self.prompt_min_tokens = int(min_tokens)
        self.tier_bytes[self.FULL] = self.fp_bytes + compute.nbytes
        self.kernels.install(self.layer, SplitForward(self.kernels.forward_of(self.layer), compute, min_tokens))

    def to_quantized(self, readers: Readers) -> None:
        self.to_tier(self.most_compressed, readers)

    def to_tier(self, tier: str, readers: Readers) -> None:
        if tier == self.tier:
            return
        self.commit(tier, self.prepare(tier, readers))

    def to_full(self, readers: Readers) -> None:
        self.to_tier(self.FULL, readers)

    def prepare(self, tier: str, readers: Readers, prove: bool = True):
        """Build `tier`'s compute (bf16: read, fuse and prepack the master); the layer is
        untouched. `prove` False: the caller proves it (`prove`) before installing it."""
        if tier == self.FULL:
            return self.prepare_full(readers)
        if tier not in self.twins:
            raise QuantLayersError(f"tier {tier} is not served here (served: {', '.join(self.twins)})")
        if self.prompt_twin is not None and self.prompt_twin[0] == tier:
            return HeldTwin(self.prompt_twin[1])  # proved when it was built
        compute = self.twins[tier].build(self.keys, readers)
        if prove:
            self.prove(compute)
        return compute

    def prove(self, compute, release_on_failure: bool = True) -> None:
        """One tiny call through a twin's compute before it is installed."""
        try:
            prove_compute(compute, self.in_features, self.out_features, self.dtype, self.fault)
        except ProofFailed:
            if release_on_failure and hasattr(compute, "release"):
                compute.release()
            raise

    def prepare_full(self, readers: Readers):
        """The bf16 prepack, built from a read-only map of the master: vLLM's prepack is the
        one copy a restore makes (measured on a 2-core AVX-512 Xeon: the fusing copy and the
        clone this replaces were about half of a restore's time)."""
        if readers.fused is not None and self.name is not None and readers.fused.has(f"{self.name}.weight"):
            master = readers.fused.get(f"{self.name}.weight")  # fused, or this rank's shard
        elif len(self.keys) == 1:
            master = readers.masters.get(f"{self.keys[0]}.weight")
        else:
            master = readers.masters.fused([f"{k}.weight" for k in self.keys])
        return self.kernels.prepack_bf16(master)

    def commit(self, tier: str, compute) -> None:
        # Dropping the old closure releases the previous precision's memory (a HeldTwin has
        # no `release`: the prompt twin stays).
        old = self.compute
        if tier == self.FULL and self.prompt_twin is not None:
            self.kernels.install(self.layer, SplitForward(compute, self.prompt_twin[1], self.prompt_min_tokens))
        else:
            self.kernels.install(self.layer, compute)
        self.compute = None if tier == self.FULL else compute
        self.tier = tier
        if old is not None and old is not compute and hasattr(old, "release"):
            old.release()

    def commit_full(self, forward: Forward) -> None:
        self.commit(self.FULL, forward)
