"""How fast vLLM's own linear kernels run one decoder layer here, per tier and batch size.

A decode step's cost that a tier changes is its linears' (attention and the KV cache are
the same in every tier), so `morphserve doctor` times the four fused linears of one decoder
layer (qkv, o, gate_up, down; vLLM fuses them this way) through the kernel objects vLLM
would build for each tier on this CPU, with random weights of the model's shapes. It takes
seconds, needs no engine and no model file, and says which tier decodes faster than bf16
here. It is a kernel figure, not a served-throughput one: scripts/bench_kernels.py
measures whole engines.
"""

from __future__ import annotations

import time
import torch

from morphserve.vllm.kernels import FUSED_LINEARS, random_compute


def fused_shapes(linear_shapes: dict[str, tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(vLLM name, out_features, in_features) of one decoder layer's fused linears."""
    out = []
    for fused, parts in FUSED_LINEARS:
        n = sum(linear_shapes[p][0] for p in parts)
        k = linear_shapes[parts[0]][1]
        out.append((fused, n, k))
    return out


def time_layer(tier: str, shapes: list[tuple[str, int, int]], batch: int, group_size: int,
               dtype: torch.dtype = torch.bfloat16, min_seconds: float = 0.4) -> float:
    """Median seconds of one decoder layer's linears at `batch` tokens (5 rounds, each at
    least min_seconds / 5 of back-to-back calls, after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    computes = [(random_compute(tier, n, k, group_size, dtype, gen, scale=1e-3), k) for _, n, k in shapes]
    inputs = [torch.randn(batch, k, generator=gen).to(dtype) for _, k in computes]
    empty = torch.empty(0, dtype=dtype)

    def layer() -> None:
        for (compute, _), x in zip(computes, inputs):
            compute(x, empty, None)

    for _ in range(3):
        layer()
    rounds = []
    for _ in range(5):
        calls, t0 = 0, time.perf_counter()
        while True:
            layer()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds / 5:
                break
        rounds.append(elapsed / calls)
    return sorted(rounds)[len(rounds) // 2]
