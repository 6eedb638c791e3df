"""Start-up KV sizing: the budget equation fixed from what vLLM measured, and the usable
KV blocks at every level. Plain Python over kv_resize.budget."""

from __future__ import annotations

import logging
from pathlib import Path

from kv_resize.budget import BudgetError, KVBudget
from morphserve.errors import MorphServeError

log = logging.getLogger("morphserve")


def model_weight_bytes(model_dir: Path) -> int:
    """Bytes of the served weights as stored (safetensors); what vLLM holds at level 0."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def plan_budget(savings: list[int], memory_budget_gb: float | None, model_dir: Path,
                fp16_kv_bytes: int, block_bytes: int) -> KVBudget:
    """The budget from `memory_budget_gb`, else from the KV vLLM would give the bf16 model;
    `savings` are the bytes each rung of the ladder frees."""
    weights = model_weight_bytes(model_dir)
    try:
        if memory_budget_gb:
            budget = KVBudget(int(memory_budget_gb * 2**30), weights, tuple(savings), block_bytes)
        else:
            budget = KVBudget.from_fp16_kv(fp16_kv_bytes, weights, savings, block_bytes)
    except BudgetError as e:
        raise MorphServeError(f"memory_budget_gb: {e}") from None
    log.info("MorphServe: budget %.1f MiB; KV %d..%d blocks from 0..%d quantized layers",
             budget.budget_bytes / 2**20, budget.usable_blocks(0), budget.usable_blocks(len(savings)), len(savings))
    return budget
