"""What this vLLM build does on this CPU, asked of vLLM's own code: which kernel runs each
tier, and whether an FP8 KV cache is allowed. `morphserve doctor` prints these; nothing here
changes vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from morphserve.vllm.kernels import TIER_OPS, bf16_dispatch_path, op_available, wna16_variant

# vLLM's CPU backend default KV block size (platforms/cpu.py check_and_update_config).
CPU_BLOCK_SIZE = 128


BF16_PATH_LABELS = {
    "zentorch": "zentorch linear",
    "sgl": "sgl bf16 GEMM (AMX)",
    "onednn": "oneDNN matmul (onednn_mm)",
    "torch": "torch.nn.functional.linear (vLLM's fallback: no oneDNN bf16 matmul on this CPU)",
}


@dataclass(frozen=True)
class KernelPaths:
    """Which of vLLM's CPU kernels each tier runs on here, in vLLM's own terms."""
    bf16: str
    w8a8: str
    w4a16: str


def kernel_paths(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> KernelPaths:
    """Mirrors vLLM 0.32's dispatch: `dispatch_cpu_unquantized_gemm` for bf16,
    CPUInt8ScaledMMLinearKernel's sgl/oneDNN choice for W8A8, CPUWNA16's ISA hint for W4A16."""
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    bf16 = BF16_PATH_LABELS[bf16_dispatch_path(n, k, dtype)]
    if not op_available(TIER_OPS["w8a8"]):
        w8 = "none (no onednn_scaled_mm in this build)"
    elif check_cpu_sgl_kernel(n, k, torch.int8):
        w8 = "CPUInt8ScaledMM, sgl int8 GEMM (AMX)"
    else:
        w8 = "CPUInt8ScaledMM, oneDNN (onednn_scaled_mm)"
    if not op_available(TIER_OPS["w4a16"]):
        w4 = "none (no cpu_gemm_wna16 in this build)"
    else:
        w4 = f"CPUWNA16 (cpu_gemm_wna16, {wna16_variant(dtype)})"
    return KernelPaths(bf16, w8, w4)


def fp8_kv_problem(head_size: int | None, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if vLLM's CPU attention accepts an FP8 KV cache here, else its own reason
    (`_get_attn_isa` raises for CPUs without AVX-512 or AMX and for head sizes it cannot tile)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        _get_attn_isa(dtype, CPU_BLOCK_SIZE, head_size, "fp8")
    except NotImplementedError as e:
        return str(e)
    return None
