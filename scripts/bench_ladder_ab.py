#!/usr/bin/env python3
"""Warm whole-ladder transitions only (0 -> top, top -> 0), in one in-process engine: the
quick instrument for an A/B of the restore path. It starts in about a minute and times
nothing else; `scripts/bench_swap.py` is the full benchmark (per-layer swaps, decode steps,
plain vLLM beside), `scripts/bench_restore.py` the stall a restore causes while decoding.

An A/B against another commit runs the same file from a worktree of it, e.g.
`git worktree add /tmp/before A && (cd /tmp/before && PYTHONPATH=/tmp/before
/work/main/.venv/bin/python /work/main/scripts/bench_ladder_ab.py --model ... --pack ...)`;
the JSON names the code it ran (`code`)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the model directory vLLM loads")
    ap.add_argument("--pack", required=True, type=Path, help="a pack from `morphserve prepare` for that model")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the engine's dtype")
    ap.add_argument("--transitions", type=int, default=7,
                    help="timed round trips (0 -> top -> 0) after two untimed ones (default 7)")
    args = ap.parse_args(argv)
    for path, what in ((args.model, "model"), (args.pack, "pack")):
        if not path.is_dir():
            print(f"error: --{what} {path}: not a directory", file=sys.stderr)
            return 2
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: no IPC in the timing

    import morphserve
    from vllm import SamplingParams

    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm

    llm = in_process_llm(args.model, args.pack, twin="pack", max_model_len=512, dtype=args.dtype)
    core = engine_core_of(llm)
    llm.generate(["hello there"], SamplingParams(max_tokens=4), use_tqdm=False)  # kernels built once
    top = len(core.morphserve_state()["kv_blocks_by_level"]) - 1  # the ladder's top (2L with two tiers)
    for _ in range(2):  # untimed: first-touch of the maps and the allocator's pools
        core.morphserve_set_level(top)
        core.morphserve_set_level(0)
    up, down = [], []
    for _ in range(args.transitions):
        t = time.perf_counter()
        core.morphserve_set_level(top)
        up.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        core.morphserve_set_level(0)
        down.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"code": morphserve.__file__, "dtype": args.dtype, "top": top,
                      "up_ms": statistics.median(up), "down_ms": statistics.median(down),
                      "up_runs_ms": up, "down_runs_ms": down}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
