"""Print the KV capacity table: blocks and tokens at 0, L/4, L/2, 3L/4 and L quantized layers.

    python scripts/capacity_table.py [--pack out/smollm2-pack] [--model .cache/models/SmolLM2-135M-Instruct]

SmolLM2 rows use the pack's measured layer bytes and the served weights' size; the
Llama rows use architecture shapes (W4A16, group 128) on 24 GB and 80 GB GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kv_resize.budget import KVBudget  # noqa: E402
from kv_resize.capacity import (GIB, LLAMA_2_7B, LLAMA_3_8B, budget_for_shape, capacity_rows,  # noqa: E402
                                gpu_budget)
from morphserve.runtime.kv_sizing import model_weight_bytes  # noqa: E402
from morphserve.harness.kv_shape import CPU_BLOCK_TOKENS, kv_block_bytes  # noqa: E402
from morphserve.offline.pack import load_manifest  # noqa: E402

GPU_BLOCK = 16  # vLLM's default KV block on GPUs, in tokens


def smollm2_budgets(pack: Path, model: Path) -> list[tuple[str, KVBudget]]:
    manifest = load_manifest(pack)
    by_layer = {b.layer: b.fp16 - b.quantized for b in manifest.layer_bytes}
    savings = tuple(by_layer[i] for i in manifest.swap_order)
    weights = model_weight_bytes(model)
    block = kv_block_bytes(model, "bfloat16")  # served in bf16
    return [
        ("SmolLM2-135M, default budget (weights + 1 GiB KV, VLLM_CPU_KVCACHE_SPACE=1)",
         KVBudget.from_fp16_kv(GIB, weights, savings, block)),
        ("SmolLM2-135M, capacity-bound budget (329 MB = bf16 weights + 60 MB KV)",
         KVBudget(329 * 10**6, weights, savings, block)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=Path("out/smollm2-pack"), help="a pack from `morphserve prepare`")
    ap.add_argument("--model", type=Path,
                    default=Path(os.environ.get("MORPHSERVE_CACHE", ".cache")) / "models/SmolLM2-135M-Instruct")
    ap.add_argument("--json", action="store_true", help="print rows as JSON instead of markdown")
    args = ap.parse_args()
    tables: list[tuple[str, KVBudget, int]] = []
    if (args.pack / "manifest.json").exists():
        tables += [(name, b, CPU_BLOCK_TOKENS) for name, b in smollm2_budgets(args.pack, args.model)]
    else:
        print(f"(no pack at {args.pack}: SmolLM2 rows skipped)", file=sys.stderr)
    for shape in (LLAMA_2_7B, LLAMA_3_8B):
        for gib in (24, 80):
            tables.append((f"{shape.name}, {gib} GB GPU (0.9 utilisation, 1.5 GiB activations)",
                           budget_for_shape(shape, gpu_budget(gib), GPU_BLOCK), GPU_BLOCK))
    rows = [r for name, b, block in tables for r in capacity_rows(name, b, block)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model and budget | quantized layers | weights (GiB) | KV blocks | KV tokens | vs FP16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['level']} | {r['weights_gib']:.3f} | {r['kv_blocks']:,} | "
              f"{r['kv_tokens']:,} | {r['vs_fp16']:+.0%} |")


if __name__ == "__main__":
    main()
