"""What oneDNN's global primitive cache costs a CPU server in memory, and what bounding it
costs in speed, measured on vLLM's own linear kernels.

Each child process builds the linears of a SmolLM2-135M-shaped model (30 layers x 4 fused
linears, random weights) through the kernel objects vLLM builds for a tier (bf16: its oneDNN
prepack; --tier w8a8: its int8 kernel), on one thread as vLLM's CPU worker runs, then
feeds them a seeded stream of step shapes like a server's: 85% decode steps of 1..24
tokens, 15% mixed steps of 100..1,500 tokens. It reports the growth of its RssAnon over
the stream and the median time of the linears of a decode step in the stream's second
half. One child per capacity and repetition, alternated, each with
ONEDNN_PRIMITIVE_CACHE_CAPACITY set before it starts (oneDNN's default is 1,024).

    python scripts/bench_onednn_cache.py [--capacities 1024,64,0] [--repeats 3] [--steps 400] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import emit_result, run_measurement  # noqa: E402
from morphserve.runtime.onednn_cache import ONEDNN_CACHE_ENV  # noqa: E402
from morphserve.runtime.proc_memory import process_rss  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1,536; fused as vLLM fuses them
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in): qkv, o, gate_up, down
LAYERS = 30


def step_shapes(steps: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 24) if rng.random() < 0.85 else rng.randint(100, 1500) for _ in range(steps)]


def child(tier: str, steps: int, seed: int) -> dict:
    import torch

    from morphserve.vllm.kernels import random_compute

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    handles = [(random_compute(tier, n, k, 64, torch.bfloat16, gen, scale=1e-3), k)
               for _ in range(LAYERS) for n, k in SHAPES]
    empty = torch.empty(0, dtype=torch.bfloat16)

    def run(h, x):
        return h[0](x, empty, None)

    inputs = {k: torch.randn(1500, k, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}
    for h in handles:  # one small step first, so the handles' own start is not counted
        run(h, inputs[h[1]][:4])
    before = process_rss(os.getpid())["rss_anon_bytes"]
    shapes = step_shapes(steps, seed)
    decode = []
    for i, m in enumerate(shapes):
        t = time.perf_counter()
        for h in handles:
            run(h, inputs[h[1]][:m])
        if i >= steps // 2 and m <= 24:
            decode.append(time.perf_counter() - t)
    return {"growth_mib": (process_rss(os.getpid())["rss_anon_bytes"] - before) / 2**20,
            "decode_linears_ms": 1000 * statistics.median(decode), "distinct_shapes": len(set(shapes)),
            "capacity": os.environ.get(ONEDNN_CACHE_ENV)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--capacities", default="1024,64,0", help="ONEDNN_PRIMITIVE_CACHE_CAPACITY values, comma-separated")
    ap.add_argument("--tier", choices=("bf16", "w8a8"), default="bf16", help="which of vLLM's linear kernels")
    ap.add_argument("--repeats", type=int, default=3, help="children per capacity, alternated")
    ap.add_argument("--steps", type=int, default=400, help="steps in each child's stream")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream of step shapes (the same in every child)")
    ap.add_argument("--out", type=Path, default=None, help="write every child's figures here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit_result(child(args.tier, args.steps, args.seed))
    capacities = [c.strip() for c in args.capacities.split(",") if c.strip()]
    runs: dict[str, list[dict]] = {c: [] for c in capacities}
    for rep in range(args.repeats):
        for cap in capacities:
            os.environ[ONEDNN_CACHE_ENV] = cap  # the child's environment
            print(f"[bench_onednn_cache] repeat {rep + 1}, capacity {cap} ...", file=sys.stderr, flush=True)
            result = run_measurement([sys.executable, __file__, "--child", cap, "--tier", args.tier,
                                      "--steps", str(args.steps), "--seed", str(args.seed)])
            if result is None:
                sys.exit(f"error: the child with capacity {cap} failed (its output is above)")
            runs[cap].append(result)
    print(f"{args.tier}, {LAYERS * len(SHAPES)} linears, {args.steps} steps "
          f"({runs[capacities[0]][0]['distinct_shapes']} distinct shapes), medians [min, max] of {args.repeats}:")
    print("| capacity | RssAnon growth (MiB) | linears of a decode step (ms) |\n|---|---|---|")
    summary = {}
    for cap, rs in runs.items():
        g = [r["growth_mib"] for r in rs]
        d = [r["decode_linears_ms"] for r in rs]
        summary[cap] = {"growth_mib": statistics.median(g), "decode_linears_ms": statistics.median(d)}
        print(f"| {cap} | {statistics.median(g):.0f} [{min(g):.0f}, {max(g):.0f}] "
              f"| {statistics.median(d):.1f} [{min(d):.1f}, {max(d):.1f}] |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": runs,
                                        "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
