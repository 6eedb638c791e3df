"""Start-up KV sizing: the budget equation fixed from what vLLM measured, and the usable
KV blocks at every level. Plain Python over kv_resize.budget."""

from __future__ import annotations

import logging
from pathlib import Path

from kv_resize.budget import BudgetError, KVBudget
from morphserve.errors import MorphServeError

log = logging.getLogger("morphserve")


def model_weight_bytes(model_dir: Path, dtype: str | None = None) -> int:
    """Bytes of the served weights as vLLM holds them at level 0: as stored (safetensors),
    or, given an engine `dtype` ("float32", "bfloat16", ...; None or "auto": the file's),
    with every floating-point tensor at that dtype's width (an fp32 engine holds a bf16 file
    at twice its size) and integer tensors (quantized weights) as stored."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if dtype in (None, "auto"):
        return sum(p.stat().st_size for p in files)
    import torch
    from safetensors import safe_open

    from quant_layers.mapped_checkpoint import slice_bytes

    width = getattr(torch, str(dtype).removeprefix("torch.")).itemsize
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:  # headers only: nothing is read but the shapes
            total += sum(slice_bytes(f.get_slice(key), float_width=width) for key in f.keys())
    return total


def plan_budget(savings: list[int], memory_budget_gb: float | None, model_dir: Path,
                fp16_kv_bytes: int, block_bytes: int, ranks: int = 1, rank_weights: int | None = None,
                dtype: str | None = None, resident_twin_bytes: int = 0) -> KVBudget:
    """The budget from `memory_budget_gb`, else from the KV vLLM would give the bf16 model;
    `savings` are the bytes each rung of the ladder frees.

    Under tensor parallelism (`ranks` > 1) the equation is one rank's: `memory_budget_gb`
    is the engine's total, shared evenly, and `rank_weights`, `savings`, `block_bytes` and
    `fp16_kv_bytes` are one rank's (each rank holds a shard of every linear and of every
    KV block). Every rank then has the same number of blocks, about what one rank would
    have with the whole budget. `dtype`: the engine's (an fp32 engine holds twice a bf16
    file's bytes). `resident_twin_bytes`: prompt twins held beside full precision, inside the
    budget (the default budget stays plain vLLM's weights + KV: the twins take KV's bytes)."""
    weights = rank_weights if rank_weights is not None else model_weight_bytes(model_dir, dtype)
    try:
        if memory_budget_gb:
            budget = KVBudget(int(memory_budget_gb * 2**30) // ranks, weights + resident_twin_bytes, tuple(savings),
                              block_bytes)
        else:
            budget = KVBudget(fp16_kv_bytes + weights, weights + resident_twin_bytes, tuple(savings), block_bytes)
    except BudgetError as e:
        raise MorphServeError(f"memory_budget_gb: {e}") from None
    log.info("MorphServe: budget %.1f MiB per rank (%d); KV %d..%d blocks from 0..%d quantized layers",
             budget.budget_bytes / 2**20, ranks, budget.usable_blocks(0), budget.usable_blocks(len(savings)), len(savings))
    return budget
