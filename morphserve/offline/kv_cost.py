"""What a KV cache dtype costs in perplexity at each level of a pack's ladder, measured once
and kept where both the evaluation and a serving engine find it.

The pack's curves measure weights only (`prepare` runs no KV cache). An FP8 cache adds its
own cost, which only vLLM can measure (`morphserve pack kv-cost`, or `evaluate` when a
suite has an FP8 system: morphserve.evaluation.kv_quality). The measurement is kept in the
cache folder, keyed by the pack (its manifest's sha256), the KV dtype, the tiers served and
the CPU kind (vLLM's attention kernels differ by kind). A server with that cache then
charges it in its quality ledger and budget, so the ledger reads what the evaluation reads.
Plain Python.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from quant_layers.cache_dir import cache_root
from quant_layers.cpu_kind import this_cpu


def levels_to_measure(top: int) -> list[int]:
    """0, the quarters of the ladder and its top: on a tiered ladder bf16, all-W8A8 and
    all-W4A16 are among them."""
    return sorted({0, top // 4, top // 2, (3 * top) // 4, top})


def factors_by_level(points: dict[int, float], top: int) -> dict[int, float]:
    """The factor at every level 0..top from the measured `points` (level -> factor), log-linear
    between two measured levels; 0 and `top` must be measured."""
    if 0 not in points or top not in points:
        raise ValueError(f"the ends of the ladder (0 and {top}) must be measured, got {sorted(points)}")
    known = sorted(points)
    out = {}
    for level in range(top + 1):
        hi = next(k for k in known if k >= level)
        lo = max(k for k in known if k <= level)
        if hi == lo:
            out[level] = points[level]
            continue
        w = (level - lo) / (hi - lo)
        out[level] = math.exp((1 - w) * math.log(points[lo]) + w * math.log(points[hi]))
    return out


def pack_id(pack: Path) -> str:
    return hashlib.sha256((Path(pack) / "manifest.json").read_bytes()).hexdigest()[:16]


def entry_key(kv_dtype: str, tiers: list[str]) -> str:
    return f"{kv_dtype}:{','.join(tiers)}:{this_cpu().isa}"


def store_path(pack: Path) -> Path:
    return cache_root() / "kv-cost" / f"{pack_id(pack)}.json"


def load(pack: Path, kv_dtype: str, tiers: list[str], top: int) -> dict | None:
    """The measured entry for this pack, dtype, served tiers and CPU kind (None if not
    measured, or measured on a ladder of another height)."""
    path = store_path(pack)
    try:
        entry = json.loads(path.read_text()).get(entry_key(kv_dtype, tiers))
    except (OSError, ValueError):
        return None
    return entry if entry and entry.get("top") == top else None


def save(pack: Path, kv_dtype: str, tiers: list[str], entry: dict) -> None:
    path = store_path(pack)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        store = json.loads(path.read_text())
    except (OSError, ValueError):
        store = {}
    store[entry_key(kv_dtype, tiers)] = entry
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two servers starting together write their own
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def entry_factors(entry: dict) -> dict[int, float]:
    return factors_by_level({int(k): float(v) for k, v in entry["factor"].items()}, int(entry["top"]))
