"""What the worker's heap trimmer costs in speed, on vLLM's own linear kernels.

Each child process builds the 120 linears of a SmolLM2-135M-shaped model (random weights)
through the kernel objects vLLM builds for a tier, on 2 threads, and feeds them a seeded
stream of `--steps` steps like a server's (85% decode steps of 1-24 tokens, 15% prompts of
100 to `--max-prompt`), with the trimmer off or calling malloc_trim every `--interval` s
from its own thread as the worker does, either every interval ("every") or only once the
child's resident set has grown `--min-growth-mb` since its last trim ("gated"; the worker's
option `heap_trim_min_growth_mb`, off by default). Children alternate, off, every, gated,
`--repeats` times; each reports the stream's wall time, the median decode and prompt step, and the
trims' count and time. `--pin` binds each child to one core, as vLLM binds its CPU
worker, so the trimmer's thread shares the computing core.

    python scripts/bench_heap_trim_speed.py [--tier w8a8] [--repeats 3] [--interval 0.5]
    python scripts/bench_heap_trim_speed.py --tier bf16 --dtype float32 --threads 1 --pin --steps 150 --max-prompt 400
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in): qkv, o, gate_up, down


def child(tier: str, interval: float, dtype_name: str = "bfloat16", threads: int = 2, pin: bool = False,
          steps_n: int = 300, max_prompt: int = 900, min_growth_mb: float = 0.0) -> dict:
    import os

    import torch

    from morphserve.runtime.heap_trimmer import HeapTrimmer
    from morphserve.vllm.kernels import random_compute

    if pin:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # threads started later inherit it
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x = {k: torch.randn(1024, k, dtype=dtype) for k in (576, 1536)}
    empty = torch.empty(0, dtype=dtype)
    linears = [(random_compute(tier, n, k, 64, dtype, gen, scale=1e-3), k) for _ in range(30) for n, k in SHAPES]
    rng = random.Random(0)
    trimmer = HeapTrimmer(interval, min_growth_bytes=int(min_growth_mb * 2**20))
    if interval > 0:
        trimmer.start()
    steps, t0 = [], time.perf_counter()
    for _ in range(steps_n):
        m = rng.randint(1, 24) if rng.random() < 0.85 else rng.randint(100, max_prompt)
        t = time.perf_counter()
        for linear, k in linears:
            linear(x[k][:m], empty, None)
        steps.append((m, time.perf_counter() - t))
    total = time.perf_counter() - t0
    trimmer.stop()
    return {"interval_s": interval, "total_s": total,
            "decode_ms": 1000 * statistics.median(s for m, s in steps if m <= 24),
            "prompt_ms": 1000 * statistics.median(s for m, s in steps if m > 24),
            "trims": trimmer.calls, "skipped": trimmer.skipped, "trim_ms": 1000 * trimmer.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tier", choices=("bf16", "w8a8"), default="w8a8", help="which of vLLM's linear kernels")
    ap.add_argument("--repeats", type=int, default=3, help="children per setting, alternated")
    ap.add_argument("--interval", type=float, default=0.5, help="the trimmer's interval in the 'on' children")
    ap.add_argument("--min-growth-mb", type=float, default=32,
                    help="the 'gated' children's margin: trim once the resident set has grown this many MiB")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the activations' and full-precision weights' dtype (float32 where bf16 is emulated)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--pin", action="store_true", help="bind each child to one core, as vLLM binds its worker")
    ap.add_argument("--steps", type=int, default=300, help="steps in each child's stream")
    ap.add_argument("--max-prompt", type=int, default=900, help="the longest prompt step, tokens")
    ap.add_argument("--out", type=Path, default=None, help="write every child's figures here as JSON")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.dtype, args.threads, args.pin, args.steps,
                               args.max_prompt, float(args.child[2]))))
        return
    settings = (("off", 0.0, 0.0), ("every", args.interval, 0.0), ("gated", args.interval, args.min_growth_mb))
    runs: dict[str, list] = {name: [] for name, _, _ in settings}
    for _ in range(args.repeats):
        for name, interval, margin in settings:
            out = subprocess.run([sys.executable, __file__, "--child", args.tier, str(interval), str(margin),
                                  "--dtype", args.dtype,
                                  "--threads", str(args.threads), "--steps", str(args.steps), "--max-prompt",
                                  str(args.max_prompt)] + (["--pin"] if args.pin else []),
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))

    def cell(name: str, key: str, fmt: str) -> str:
        values = [r[key] for r in runs[name]]
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"

    print(f"{args.tier} ({args.dtype}), 120 linears, {args.steps} steps, {args.threads} threads"
          f"{', pinned to one core' if args.pin else ''}, trimmer ticks every {args.interval} s, gated at "
          f"{args.min_growth_mb} MiB of growth; "
          f"medians [min, max] of {args.repeats}:")
    print("| trimmer | stream (s) | decode step (ms) | prompt step (ms) | trims | skipped ticks | time in trims (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, _, _ in settings:
        print(f"| {name} | {cell(name, 'total_s', '.2f')} | {cell(name, 'decode_ms', '.2f')} | "
              f"{cell(name, 'prompt_ms', '.1f')} | {cell(name, 'trims', '.0f')} | {cell(name, 'skipped', '.0f')} | "
              f"{cell(name, 'trim_ms', '.0f')} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
