"""vLLM's linear kernels as MorphServe uses them (vLLM 0.32.0, CPU): which 4-bit kernel
runs (W4A16, pinned), the kernel objects, the bf16 prepack, and the `cpu_linear` slot a
swap replaces. `VllmCpuKernels` is the `quant_layers.swappable.LinearKernels` the worker
hands to every swappable linear.
"""

from __future__ import annotations

import functools
import os

import torch

from morphserve.vllm import compiled_slots

# On CPUs with AMX, vLLM 0.32's CPUWNA16 kernel serves 4-bit layers as W4A8 (activations
# quantized to int8 per token) unless VLLM_CPU_INT4_W4A8=0. A pack's quality curve measures
# W4A16 (bf16 activations); on SmolLM2 the all-layers W4A8 perplexity is about 7% above it.
# MorphServe serves what its curve measured, and every 4-bit baseline it is compared with
# runs under the same setting.
W4A16_ENV = {"VLLM_CPU_INT4_W4A8": "0"}


def pin_w4a16_kernel() -> None:
    """Set W4A16_ENV in this process (engine cores and workers inherit it), or refuse if the
    operator asked for W4A8, whose quality the pack does not describe."""
    from vllm import envs

    from morphserve.errors import MorphServeError

    changed = False
    for key, value in W4A16_ENV.items():
        if os.environ.get(key, value) != value:
            raise MorphServeError(f"MorphServe serves the W4A16 kernel its pack's quality curve measured; "
                                  f"unset {key} (it is {os.environ[key]!r})")
        changed |= os.environ.get(key) != value
        os.environ[key] = value
    if changed and envs._is_envs_cache_enabled():  # an earlier engine in this process froze vLLM's env reads
        envs.__getattr__.cache_clear()


@functools.cache  # the permission is the whole process's, for good: once is enough
def allow_amx_tiles() -> None:
    """Ask Linux for this process's AMX tile state, where the CPU has AMX.

    A process may execute AMX tile instructions only after asking (arch_prctl
    ARCH_REQ_XCOMP_PERM); otherwise its first one dies of SIGILL. oneDNN asks on its first AMX
    kernel, but vLLM 0.32's CPUWNA16 AMX path (`cpu_gemm_wna16`, ISA hint "amx", which the
    W4A16 pin selects on AMX CPUs) does not: in a process where it is the first AMX user, the
    tier probe's child, the probe died of signal 4 and serve dropped a tier the CPU runs
    (seen on a 2-vCPU Xeon with AMX under KVM). torch's own request, not a syscall of ours:
    torch keeps the feature numbers and the check for the kernel's support."""
    init = getattr(torch._C._cpu, "_init_amx", None)
    if init is not None and torch.cpu._is_amx_tile_supported():
        init()


def wna16_variant(dtype: torch.dtype) -> str:
    """The CPUWNA16 path a 4-bit layer gets (ISA and W4A8 or W4A16): part of the twin cache
    key, since the two lay out their tensors differently. Pins W4A16 first: every process
    that builds or describes a 4-bit kernel for MorphServe (serve, `doctor`, `prepare`'s
    timing, the tier probe) must mean the kernel serve runs."""
    from vllm import envs

    pin_w4a16_kernel()

    # mirrors layer.use_w4a8 in CPUWNA16LinearKernel.process_weights_after_loading (x86 branch)
    w4a8 = envs.VLLM_CPU_INT4_W4A8 and dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported()
    return f"{wna16_isa_hint(dtype)}-{'w4a8' if w4a8 else 'w4a16'}"


# -- read-only helpers over vLLM kernels -------------------------------------------------
def make_wna16_kernel(in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
    """vLLM's own choice of W4A16 kernel for this shape (CPUWNA16 on CPU), the one serve runs:
    W4A16 pinned (vLLM reads the setting when it processes the weights) and AMX allowed. On an
    AMX CPU an unpinned process (`doctor`, `prepare`) had probed and timed vLLM's W4A8 path,
    a different kernel with other speeds, and a clean process running the W4A16 one died."""
    pin_w4a16_kernel()
    allow_amx_tiles()
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    cfg = MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features), partition_weight_shape=(in_features, out_features),
        weight_type=scalar_types.uint4b8, act_type=dtype, group_size=group_size, zero_points=False,
    )
    kernel_cls = choose_mp_linear_kernel(cfg)
    return kernel_cls(cfg, w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                      w_zp_param_name="weight_zero_point")


def int8_held_bytes(out_features: int, in_features: int) -> int:
    """What vLLM's CPU int8 kernel holds for one linear: int8 weights and fp32 per-channel
    scales, plus, on its oneDNN path (CPUs without AMX, or shapes sgl does not tile), an fp32
    `azp_adj` row it keeps for dynamic activations. vLLM's own test picks the path."""
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    held = out_features * in_features + 4 * out_features
    return held if check_cpu_sgl_kernel(out_features, in_features, torch.int8) else held + 4 * out_features


def make_int8_kernel(static_input: bool = False, symmetric: bool = True):
    """vLLM's own choice of int8 W8A8 kernel, configured exactly as its
    CompressedTensorsW8A8Int8 scheme configures it for llm-compressor's W8A8 preset
    (per-channel weights, dynamic symmetric per-token activations):
    `choose_scaled_mm_linear_kernel` -> CPUInt8ScaledMMLinearKernel on CPU. One per fused
    linear: the kernel object keeps per-layer state (the path it picked, a oneDNN handle).
    `static_input`/`symmetric`: other activation schemes, for tests of what the lean call covers."""
    from vllm.model_executor.kernels.linear import init_int8_linear_kernel

    return LeanInt8Kernel(init_int8_linear_kernel(is_channelwise=True, is_static_input_scheme=static_input,
                                                  input_symmetric=symmetric, module_name="MorphServe W8A8 twin"))


class LeanInt8Kernel:
    """vLLM's CPU int8 kernel, processed by vLLM, called without its per-call Python glue.

    A compiled static W8A8 model traces vLLM's `apply_weights` away: Inductor's wrapper
    calls the two ops (`dynamic_scaled_int8_quant`, `onednn_scaled_mm`) directly. A
    swappable layer cannot be traced (a swap changes its kernel), so every call of a twin
    ran that glue in Python: five attribute reads through nn.Module, two wrapper functions,
    the reshape checks. This binds, once, what the glue looks up on every call (the oneDNN
    handle, `azp_adj`, the output width) and calls the same ops with the same arguments,
    so the result is bit-identical (tested) at about half the glue's cost (measured,
    docs/RESULTS.md). Configurations the lean call does not cover (static or asymmetric
    activations) keep vLLM's `apply_weights`.

    It also breaks vLLM's reference cycle (the kernel holds a bound method of itself):
    once the lean call exists, nothing references vLLM's kernel object but this one.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.call = None  # (x, bias) -> out, bound by process_weights_after_loading
        self.lean = False  # whether `call` is the lean one (else vLLM's apply_weights)

    def process_weights_after_loading(self, holder: torch.nn.Module) -> None:
        self.kernel.process_weights_after_loading(holder)
        self.call = lean_int8_call(self.kernel, holder)
        self.lean = self.call is not None
        if self.lean:
            vars(self.kernel).clear()  # the bound method's cycle; the call holds what it needs
        else:
            kernel = self.kernel
            self.call = lambda x, bias: kernel.apply_weights(holder, x, bias)

    def apply_weights(self, holder: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
        return self.call(x, bias)

    def release(self) -> None:
        """Free the native state now (see quant_layers.swappable.W8Compute.release)."""
        vars(self.kernel).clear()
        self.call = None


def lean_int8_call(kernel, holder: torch.nn.Module):
    """`kernel.apply_weights(holder, ., .)` as a closure over what it reads, or None where
    the configuration is not the dynamic symmetric per-token one MorphServe's twins use.
    Mirrors CPUInt8ScaledMMLinearKernel._apply_weights_onednn / _apply_weights_sgl (0.32.0).
    The closure holds all it reads (the oneDNN handler object, or the holder's packed
    weight), so the caller may then drop vLLM's kernel."""
    config = kernel.config
    if config.is_static_input_scheme or not config.input_symmetric:
        return None
    method = getattr(kernel.linear_method, "__name__", "")
    if method == "_apply_weights_sgl":
        scaled_mm = torch.ops._C.int8_scaled_mm_with_quant.default
        w_q, w_s, bias_fp32 = holder.weight, holder.weight_scale, getattr(holder, "bias_fp32", None)

        def sgl(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return scaled_mm(x, w_q, w_s, bias_fp32 if bias is not None else None, x.dtype, True)

        return sgl
    if method != "_apply_weights_onednn":
        return None
    handler = kernel.dnnl_handler  # owns the native handle: freed when this closure goes
    handle, n, azp_adj = handler.handler_tensor, handler.n, holder.azp_adj
    quant = torch.ops._C.dynamic_scaled_int8_quant.default
    scaled_mm = torch.ops._C.onednn_scaled_mm.default
    empty = _empty_strided

    def onednn(x: torch.Tensor, bias: torch.Tensor | None, _handler=handler) -> torch.Tensor:
        shape = x.shape
        if len(shape) != 2:
            x = x.reshape(-1, shape[-1])
        m, k = x.shape
        x_q = empty((m, k), (k, 1), torch.int8)
        x_s = empty((m, 1), (1, 1), torch.float32)
        quant(x_q, x, x_s, None)
        out = empty((m, n), (n, 1), x.dtype)
        scaled_mm(out, x_q, x_s, None, azp_adj, bias, handle)
        return out.reshape(*shape[:-1], n) if len(shape) > 2 else out

    return onednn


def _torch_empty_strided(size: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype)


try:
    # What Inductor's CPU wrapper allocates its buffers with (torch 2.13; the compiled static
    # W8A8 graph calls it for the same two ops' buffers): 0.4 us against torch.empty's 1.2 on
    # a Zen 5 EPYC. A compiled twin allocates three buffers a linear, 120 linears a step.
    from torch._C._dynamo.guards import _empty_strided_cpu as _empty_strided
except ImportError:  # another torch: the public call, the same tensors
    _empty_strided = _torch_empty_strided


# What CPUWNA16LinearKernel.process_weights_after_loading (0.32.0) leaves on a layer besides
# its parameters; apply_weights reads these. Captured once, restored on every quantize.
WNA16_LAYER_ATTRS = ("isa_hint", "use_w4a8")


def wna16_isa_hint(dtype: torch.dtype) -> str:
    """The ISA path CPUWNA16 picks for scales of this dtype (part of the twin cache key)."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import _get_isa_hint

    return _get_isa_hint(dtype)


def wna16_kernel_state(layer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """A processed W4A16 layer as (parameters, plain attributes), to be stored in a file."""
    tensors = {name: p.data for name, p in layer.named_parameters(recurse=False)}
    attrs = {a: getattr(layer, a) for a in WNA16_LAYER_ATTRS if hasattr(layer, a)}
    return tensors, attrs


def prepack_unquantized(layer: torch.nn.Module) -> None:
    """vLLM's CPU bf16 prepack: sets layer.cpu_linear and empties layer.weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


@functools.lru_cache(maxsize=None)  # asked on every restore of every linear; the answer is fixed per shape
def bf16_dispatch_path(n: int, k: int, dtype: torch.dtype) -> str:
    """Which path vLLM's CPU bf16 dispatch (model_executor/layers/utils.py
    dispatch_cpu_unquantized_gemm) takes for an [n, k] weight here: "zentorch", "sgl" (AMX),
    "onednn" (a oneDNN handle) or "torch" (its fallback, `torch.nn.functional.linear` on the
    weight argument). Mirrors that function's branch order."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    from vllm.platforms import CpuArchEnum, current_platform

    if current_platform.is_zen_cpu() and hasattr(torch.ops, "zentorch") and hasattr(
            torch.ops.zentorch, "zentorch_linear_unary"):
        return "zentorch"
    if check_cpu_sgl_kernel(n, k, dtype):
        return "sgl"
    if not ops._supports_onednn or current_platform.get_cpu_architecture() == CpuArchEnum.POWERPC:
        return "torch"
    # vLLM tries a oneDNN handle and falls back to torch's linear when oneDNN refuses the
    # dtype: it has no bf16 matmul on CPUs without AVX512_BF16/AMX (seen on an AVX2 EPYC).
    try:
        ops.create_onednn_mm(torch.zeros(n, k, dtype=dtype).t(), 32)
    except RuntimeError:
        return "torch"
    return "onednn"


# The dispatch paths that copy the weight into their own packed form (checked: a oneDNN
# handle computes the same after its source tensor is zeroed).
PACKING_PATHS = ("sgl", "onednn")


def bf16_prepack_copies(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether vLLM's bf16 dispatch copies the weight into its own packed form."""
    return bf16_dispatch_path(n, k, dtype) in PACKING_PATHS


def decoder_layers(model: torch.nn.Module):
    """vLLM's Llama decoder layers (model.model.layers)."""
    return model.model.layers


# vLLM fuses HF linears: (vLLM module path inside a decoder layer, HF names in order).
FUSED_LINEARS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


class VllmCpuKernels:
    """quant_layers.swappable.LinearKernels over vLLM's CPU path.

    On CPU, vLLM's `UnquantizedLinearMethod` prepacks the bf16 weight into
    `layer.cpu_linear` (a closure over a oneDNN handle) and calls it on every forward; a
    swap replaces that closure. In a compiled engine (`compiled`), adopted layers call
    their closure through a slot instead (morphserve.vllm.compiled_slots), which a swap
    rewrites: the compiled graph keeps calling the slot.
    """

    def __init__(self, compiled: bool = False):
        self.compiled = compiled

    def make_w4(self, in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
        return make_wna16_kernel(in_features, out_features, group_size, dtype)

    def make_w8(self):
        return make_int8_kernel()

    def w8_bytes(self, out_features: int, in_features: int) -> int:
        return int8_held_bytes(out_features, in_features)

    def w4_state(self, holder: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        return wna16_kernel_state(holder)

    def prepack_bf16(self, master: torch.Tensor):
        """The closure owns vLLM's packed copy (a oneDNN handle, or the sgl packed weight)
        and ignores its `weight` argument, so it can be built off to the side and installed
        later; `master` (typically a read-only file map) is not referenced afterwards.
        vLLM's other dispatch paths (zentorch, the torch fallback) compute on the weight
        tensor itself, so there it gets an own copy first, bound into the forward: the
        fallback reads the `weight` argument, which a swapped layer no longer has."""
        path = bf16_dispatch_path(*master.shape, master.dtype)
        copies = path in PACKING_PATHS
        if not copies:
            master = master.clone()
        if path == "torch":
            # vLLM's own fallback forward, without its dispatch: that retries a oneDNN handle on
            # every call, which fails again (0.75 ms a linear, a third of a 30-layer restore on
            # a 2-core AVX2 EPYC), before it installs exactly this.
            return _bound(torch.nn.functional.linear, master)
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(master, requires_grad=False)
        holder.bias = None
        prepack_unquantized(holder)
        return holder.cpu_linear if copies else _bound(holder.cpu_linear, holder.weight)

    def adopt(self, layer: torch.nn.Module) -> None:
        """Make the layer's loaded bf16 forward own its weight, as `prepack_bf16`'s do.
        Where vLLM prepacked (oneDNN, sgl) `layer.weight` is already empty. Where it fell
        back to `torch.nn.functional.linear` (oneDNN has no bf16 matmul on AVX2-only CPUs)
        the forward reads `layer.weight` on every call: the weight is bound into the
        closure and the parameter emptied, so the closure is its only holder, a swap frees
        it, and the model's parameters count it once (the linear's own bytes)."""
        weight = layer.weight
        if weight.numel() > 0:
            layer.cpu_linear = _bound(layer.cpu_linear, weight.data)
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device),
                                              requires_grad=False)
        if self.compiled:  # before vLLM traces the model: the trace must call the slot
            compiled_slots.route(layer)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def own(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def has_slot(self, layer: torch.nn.Module) -> bool:
        return hasattr(layer, "cpu_linear")

    def install(self, layer: torch.nn.Module, forward) -> None:
        if compiled_slots.is_routed(layer):
            compiled_slots.install(layer, forward)
        else:
            layer.cpu_linear = forward

    def forward_of(self, layer: torch.nn.Module):
        """The forward `layer` computes with now (for a benchmark that wraps it)."""
        return compiled_slots.forward_of(layer) if compiled_slots.is_routed(layer) else layer.cpu_linear


def _bound(forward, weight: torch.Tensor):
    """`forward` with its weight fixed: vLLM's `cpu_linear(x, weight, bias)` on a path that
    computes on the weight argument itself (the torch fallback)."""
    return lambda x, _weight, bias: forward(x, weight, bias)


# -- tiers probed on this CPU --------------------------------------------------------------
# The vLLM op each tier's CPU kernel calls. vllm-cpu 0.32 loads one of three builds by ISA
# (platforms/cpu.py import_kernels); `_C_AVX2` has onednn_mm and onednn_scaled_mm but no
# cpu_gemm_wna16, so a W4A16 layer there dies in its first forward.
TIER_OPS = {"w8a8": "onednn_scaled_mm", "w4a16": "cpu_gemm_wna16"}
# Test-only: these ops behave as if this CPU's vLLM build lacked them (in every process,
# plain engines included), so an AVX2 machine's behaviour can be checked on any machine.
HIDE_OPS_ENV = "MORPHSERVE_TEST_HIDE_OPS"


def hidden_ops() -> set[str]:
    return {n.strip() for n in os.environ.get(HIDE_OPS_ENV, "").split(",") if n.strip()}


def hide_ops_for_tests() -> None:
    """Replace vLLM's wrappers of the hidden ops with what an AVX2 build gives: the same
    AttributeError from the op namespace, raised at the first call."""
    names = hidden_ops()
    if not names:
        return
    import vllm._custom_ops as ops

    for name in names:
        def missing(*_args, _name=name, **_kwargs):
            raise AttributeError(f"'_OpNamespace' '_C' object has no attribute '{_name}' ({HIDE_OPS_ENV})")

        setattr(ops, name, missing)


def op_available(name: str) -> bool:
    """Whether this process's vLLM build registered `name` (the AVX2 build lacks some)."""
    if name in hidden_ops():
        return False
    import vllm._custom_ops  # noqa: F401  (loads the build for this CPU: current_platform.import_kernels)

    return hasattr(torch.ops._C, name)


def missing_feature(tier: str) -> str:
    """Why this CPU lacks `tier`'s kernel, in the CPU's terms."""
    from quant_layers.cpu_kind import this_cpu

    cpu = this_cpu()
    if TIER_OPS[tier] in hidden_ops():
        return f"vLLM's CPU build for this CPU ({cpu.isa}) has no {TIER_OPS[tier]} (hidden by {HIDE_OPS_ENV}, as on AVX2)"
    if tier == "w4a16" and not cpu.avx512:
        return f"this CPU ({cpu.isa}) has no AVX-512, and vLLM's AVX2 build has no W4A16 kernel (cpu_gemm_wna16)"
    return f"vLLM's CPU build for this CPU ({cpu.isa}) has no {TIER_OPS[tier]}"


def random_compute(tier: str, n: int, k: int, group_size: int, dtype: torch.dtype, gen: torch.Generator,
                   scale: float):
    """A `tier` compute (bf16, w8a8, w4a16) of shape n x k with random weights, built through
    the same vLLM kernel objects a swap installs: for probing a tier and for timing it."""
    kernels = VllmCpuKernels()
    if tier == "bf16":
        return kernels.prepack_bf16((torch.randn(n, k, generator=gen) * scale).to(dtype))
    if tier == "w8a8":
        from quant_layers.swappable import W8Compute

        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return W8Compute(make_int8_kernel(), weight, torch.full((n, 1), scale), [n])
    from quant_layers.swappable import PackedShard, W4Compute, process_for_kernel

    shard = PackedShard(torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=gen),
                        torch.full((n, k // group_size), scale, dtype=dtype))
    tensors, attrs = process_for_kernel([shard], k, group_size, dtype, kernels)
    return W4Compute(make_wna16_kernel(k, n, group_size, dtype), tensors, attrs)


def probe_tier(tier: str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when this CPU runs `tier` through vLLM's own kernel class: its op exists and one
    tiny call returns finite values of the right shape. Otherwise one line saying why."""
    from quant_layers.swappable import prove_compute

    if not op_available(TIER_OPS[tier]):
        return missing_feature(tier)
    k = n = 64  # CPUWNA16 needs multiples of 32; group 32 divides both
    try:
        compute = random_compute(tier, n, k, 32, dtype, torch.Generator().manual_seed(0), scale=0.01)
        prove_compute(compute, k, n, dtype)
    except Exception as e:  # any failure of the kernel is a reason not to serve the tier
        if isinstance(e, AttributeError) and TIER_OPS[tier] in str(e):
            return missing_feature(tier)
        return f"vLLM's {tier} kernel failed a probe on this CPU: {type(e).__name__}: {e}"
    return None


def probe_tiers(tiers, dtype: torch.dtype = torch.bfloat16) -> dict[str, str | None]:
    """tier -> None (runs here) or the reason it does not."""
    return {t: probe_tier(t, dtype) for t in tiers}
