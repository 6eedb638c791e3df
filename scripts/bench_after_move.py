"""Decode speed right after a move, in one in-process MorphServe engine: does a level run
slower for a while after the layers that make it were swapped in?

A served replay (`scripts/decode_gaps.py --by-level`) can show a level decoding slower than
another with the same kernels; this takes the server away (no API server, no separate
worker, no policy, no trims) and times, at batch `--batch`, `--generates` consecutive
generates of 32 decode steps each at `--low`, right after a synchronous move from `--high`
down to it, and right after the same move made in the background (prepared in a thread
and installed at step boundaries, as the policy's restores are). The first generate after
a move also pays what is new (oneDNN builds a kernel the first time a fresh int8 handle
sees a batch size), so read the series, not its first figure.

    python scripts/bench_after_move.py --model MODEL_DIR --pack PACK_DIR [--high 33 --low 30] [--compute-cpus all]

Prints one line per series: milliseconds per step of each generate, and the level served.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts.bench_same_rung import generate_timer  # noqa: E402  (the same synthetic prompts and timing)

STEPS = 32  # decode steps per generate (33 tokens: the first comes from the prompt step)
MAX_WAIT_GENERATES = 50  # tiny generates that drive step boundaries until a background move is installed


def main(argv: list[str] | None = None) -> int:
    from morphserve.runtime import compute_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, help="the pack")
    ap.add_argument("--high", type=int, default=33, help="the level moved from (default 33)")
    ap.add_argument("--low", type=int, default=30, help="the level moved to and timed (default 30)")
    ap.add_argument("--batch", type=int, default=4, help="requests per generate (default 4)")
    ap.add_argument("--generates", type=int, default=6, help="consecutive generates timed per series (default 6)")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole sequence runs (default 2)")
    ap.add_argument("--eager", action="store_true", help="eager engine (default: compiled, as served)")
    ap.add_argument("--compute-cpus", choices=compute_cpus.MODES, default=compute_cpus.DEFAULT_MODE,
                    help="vllm (default): vLLM's binding; all: every CPU computes (morphserve serve --compute-cpus all)")
    args = ap.parse_args(argv)
    if not 0 <= args.low < args.high:
        ap.error("--low must be below --high (a restore is what is timed)")

    from morphserve.vllm.offline_engine import controller_of, engine_core_of, in_process_llm

    compute_cpus.apply(os.environ, args.compute_cpus)  # read by vLLM's worker as it binds its threads

    llm = in_process_llm(args.model, args.pack, enforce_eager=args.eager, max_model_len=2048,
                         max_num_seqs=max(32, args.batch), dtype="bfloat16",
                         morph={"compile": not args.eager, "heap_trim_interval_s": 0,
                                "frontend_heap_trim_interval_s": 0})
    core = engine_core_of(llm)
    controller = controller_of(core)
    timed = generate_timer(llm)
    timed(args.batch, STEPS + 1)

    def series(label: str) -> None:
        ms = [round(1000 * timed(args.batch, STEPS + 1, salt=1000 + i) / (STEPS + 1), 1) for i in range(args.generates)]
        print(f"{label}: ms per step at batch {args.batch}: {ms}; level {core.morphserve_state()['level']}", flush=True)

    for r in range(args.rounds):
        core.morphserve_set_level(args.high)
        series(f"round {r + 1}, at {args.high}")
        core.morphserve_set_level(args.low)
        series(f"round {r + 1}, {args.high} -> {args.low} synchronous")
        core.morphserve_set_level(args.high)
        series(f"round {r + 1}, at {args.high} again")
        controller.moves.to(args.low, reason="bench_after_move", background=True)
        for _ in range(MAX_WAIT_GENERATES):
            if controller.moves.restoring is None:
                break
            timed(1, 4)
        series(f"round {r + 1}, {args.high} -> {args.low} in the background")
    return 0


if __name__ == "__main__":
    sys.exit(main())
