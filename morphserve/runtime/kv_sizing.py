"""Start-up KV sizing: the budget equation fixed from what vLLM measured, and the usable
KV blocks at every level. Plain Python over kv_resize.budget."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from kv_resize.budget import BudgetError, KVBudget
from morphserve.errors import MorphServeError

log = logging.getLogger("morphserve")


def float_width(dtype: str | None) -> int | None:
    """Bytes per floating-point element an engine of `dtype` holds; None for the file's own
    ("auto" or unset)."""
    if dtype in (None, "auto"):
        return None
    import torch

    return getattr(torch, str(dtype).removeprefix("torch.")).itemsize


def model_weight_bytes(model_dir: Path, dtype: str | None = None) -> int:
    """Bytes of the served weights as vLLM holds them at level 0: as stored (safetensors),
    or, given an engine `dtype` ("float32", "bfloat16", ...; None or "auto": the file's),
    with every floating-point tensor at that dtype's width (an fp32 engine holds a bf16 file
    at twice its size) and integer tensors (quantized weights) as stored."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    width = float_width(dtype)
    if width is None:
        return sum(p.stat().st_size for p in files)
    from safetensors import safe_open

    from quant_layers.mapped_checkpoint import slice_bytes

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
    total = int(memory_budget_gb * 2**30) // ranks if memory_budget_gb else fp16_kv_bytes + weights
    try:
        if resident_twin_bytes:
            # The twins may leave level 0 without a block: the server then rests higher
            # (rest_floor), so the budget need only hold blocks from its first level that has some.
            top = KVBudget(total, weights + resident_twin_bytes, tuple(savings), block_bytes, floor=len(savings))
            budget = replace(top, floor=next(k for k in range(len(savings) + 1) if top.total_blocks(k) >= 2))
        else:
            budget = KVBudget(total, weights, tuple(savings), block_bytes)
    except BudgetError as e:
        raise MorphServeError(f"memory_budget_gb: {e}") from None
    log.info("MorphServe: budget %.1f MiB per rank (%d); KV %d..%d blocks from 0..%d quantized layers",
             budget.budget_bytes / 2**20, ranks, budget.usable_blocks(0), budget.usable_blocks(len(savings)), len(savings))
    return budget


def rest_floor(capacities: list[int], block_tokens: int, max_model_len: int, twin_rungs: int = 0) -> int:
    """The lowest level the server may serve: the first whose usable KV blocks hold one
    max_model_len request. Level 0 without prompt twins (`twin_rungs`, the ladder's first
    rungs that have one); with them, their resident bytes may leave level 0 short, and the
    server rests on the first rung that pays for the rest: prompts still go through every
    twin, decodes through int8 only on the rungs below the floor. A floor at or above the
    twinned rungs would make every twin a quantized layer: refused, as it gains nothing."""
    holds = [k for k, cap in enumerate(capacities) if cap * block_tokens >= max_model_len]
    if holds and (holds[0] == 0 or holds[0] < twin_rungs):
        return holds[0]
    tokens0 = capacities[0] * block_tokens
    if not twin_rungs:
        raise MorphServeError(
            f"the memory budget leaves {tokens0} KV tokens at full precision, fewer than max_model_len "
            f"{max_model_len}; raise the budget or lower --max-model-len")
    if not holds:
        raise MorphServeError(
            f"with {twin_rungs} prompt twins resident the memory budget holds a max_model_len ({max_model_len}) "
            f"request at no level; hold fewer prompt twins (prompt_twin_layers), raise the budget or lower "
            f"--max-model-len")
    raise MorphServeError(
        f"with {twin_rungs} prompt twins resident the memory budget holds a max_model_len ({max_model_len}) request "
        f"only from level {holds[0]}, where every twinned layer is quantized already; twins serve prompts only on "
        f"the rungs below their count, so set prompt_twin_layers above the level that holds the request (0 turns "
        f"them off), raise the budget or lower --max-model-len")
