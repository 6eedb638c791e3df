"""How fast vLLM's own linear kernels run one decoder layer here, per tier and batch size.

A decode step's cost that a tier changes is its linears' (attention and the KV cache are
the same in every tier), so `morphserve doctor` times the four fused linears of one decoder
layer (qkv, o, gate_up, down; vLLM fuses them this way) through the kernel objects vLLM
would build for each tier on this CPU, with random weights of the model's shapes, cycling
through enough copies of the layer that the weights stream from memory as in a real step
(`layer_copies`). It takes seconds, needs no engine and no model file, and says which tier
decodes faster than bf16 here. It is a kernel figure, not a served-throughput one:
scripts/bench_kernels.py measures whole engines.
"""

from __future__ import annotations

import math
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


# A timing streams at least this many times the last-level cache in weights. One SmolLM2
# layer (7 MB in bf16) stays in a 32 MiB L3 when timed alone, so its bf16 linears looked as
# fast as int8's at batch 1 on an AMD EPYC while the whole engine decoded 12% faster in W8A8
# (docs/RESULTS.md, "A kernel profile that streams its weights"): a decode step reads every
# layer's weights from memory once, and int8 reads half the bytes.
STREAM_FACTOR = 4

BYTES_PER_WEIGHT = {"bf16": 2.0, "w8a8": 1.0, "w4a16": 0.5}  # scales and sums are a rounding error here


def weight_bytes(tier: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes per weight of `tier` in an engine of `dtype`: the full-precision rung (named
    "bf16" whatever the engine's dtype) holds the engine's width, fp32 where bf16 is emulated."""
    return float(dtype.itemsize) if tier == "bf16" else BYTES_PER_WEIGHT[tier]


def layer_copies(tier: str, shapes: list[tuple[str, int, int]], num_layers: int, cache_bytes: int,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """How many distinct copies of a layer a timing cycles through: enough to stream
    STREAM_FACTOR x the last-level cache, never more than the model has (a model that fits
    in cache is served from cache too), at least one."""
    layer_bytes = weight_bytes(tier, dtype) * sum(n * k for _, n, k in shapes)
    return max(1, min(num_layers, math.ceil(STREAM_FACTOR * cache_bytes / layer_bytes)))


def time_layer(tier: str, shapes: list[tuple[str, int, int]], batches: tuple[int, ...], group_size: int,
               dtype: torch.dtype = torch.bfloat16, min_seconds: float = 0.4, copies: int = 1) -> dict[int, float]:
    """Batch -> median seconds of one decoder layer's linears at that many tokens (5 rounds,
    each at least min_seconds / 5 of back-to-back passes over `copies` distinct layers, after
    a warm-up), per layer. The copies are built once for every batch: a W8A8 copy's oneDNN
    prepack costs milliseconds."""
    gen = torch.Generator().manual_seed(0)
    layers = [[(random_compute(tier, n, k, group_size, dtype, gen, scale=1e-3), k) for _, n, k in shapes]
              for _ in range(copies)]
    empty = torch.empty(0, dtype=dtype)
    seconds = {}
    for batch in batches:
        inputs = {k: torch.randn(batch, k, generator=gen).to(dtype) for _, _, k in shapes}

        def stack() -> None:
            for layer in layers:
                for compute, k in layer:
                    compute(inputs[k], empty, None)

        for _ in range(2):
            stack()
        rounds = []
        for _ in range(5):
            calls, t0 = 0, time.perf_counter()
            while True:
                stack()
                calls += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds / 5:
                    break
            rounds.append(elapsed / calls / copies)
        seconds[batch] = sorted(rounds)[len(rounds) // 2]
    return seconds
