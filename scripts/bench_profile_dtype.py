"""The start-up kernel profile in each engine dtype: which rung is fast depends on it.

A server seeds its policy's step-time model with one decoder layer's linears timed through
vLLM's kernels per tier and batch (morphserve.runtime.tier_speed), in the engine's own dtype.
This times that profile in bf16 and in fp32, `--repeats` times each, and prints the median
[range] in ms per tier and batch, and int8's speed relative to the full-precision rung in
each dtype. On a CPU that emulates bf16 (AVX2 only) the two dtypes give opposite answers.

    python scripts/bench_profile_dtype.py --model MODEL_DIR [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.runtime.tier_speed import BATCHES  # noqa: E402  (the batches a server times)
from morphserve.vllm.kernel_speed import fused_shapes, layer_copies, time_layer  # noqa: E402
from morphserve.vllm.kernels import probe_tier  # noqa: E402
from quant_layers.cpu_kind import last_level_cache_bytes, this_cpu  # noqa: E402
from quant_layers.model_info import read_model_info  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the bf16 HF model folder (its shapes are timed)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per dtype and tier (default 3)")
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    info = read_model_info(args.model)
    shapes, llc = fused_shapes(info.linear_shapes), last_level_cache_bytes()
    tiers = ["bf16", *[t for t in ("w8a8",) if probe_tier(t) is None]]
    cpu = this_cpu()
    print(f"CPU: {cpu.model} ({cpu.isa}); last-level cache {llc / 2**20:.0f} MiB; tiers {tiers}")
    result: dict = {"cpu": cpu.model, "isa": cpu.isa, "batches": list(BATCHES), "ms": {}}
    for name, dtype in DTYPES.items():
        result["ms"][name] = {}
        for tier in tiers:
            copies = layer_copies(tier, shapes, info.num_layers, llc, dtype)
            runs = [time_layer(tier, shapes, BATCHES, 0, dtype, copies=copies) for _ in range(args.repeats)]
            result["ms"][name][tier] = {b: [r[b] * 1e3 for r in runs] for b in BATCHES}
    print("\nms per decoder layer's linears, median [range] of", args.repeats, "timings")
    print(f"{'dtype':9} {'tier':5} " + " ".join(f"{b:>22}" for b in BATCHES))
    for name, by_tier in result["ms"].items():
        for tier, by_batch in by_tier.items():
            cells = [f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in by_batch.values()]
            print(f"{name:9} {tier:5} " + " ".join(f"{c:>22}" for c in cells))
    if "w8a8" in tiers:
        print("\nint8's speed relative to the full-precision rung (its time / int8's, medians)")
        for name, by_tier in result["ms"].items():
            ratios = [statistics.median(by_tier["bf16"][b]) / statistics.median(by_tier["w8a8"][b]) for b in BATCHES]
            print(f"{name:9} " + " ".join(f"{b:>5}: {r:.2f}x" for b, r in zip(BATCHES, ratios)))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
