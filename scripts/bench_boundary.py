"""What MorphServe's controller costs between two steps, served in one real engine: the step
boundary (sample the scheduler, update the signals and the quality ledger, the policy's
decision, any worker call that falls due) runs on the engine core's thread after one step's
output and before the next schedule(), so vLLM's worker waits for every microsecond of it.

One in-process engine (vLLM's compiled graph unless `--eager`) with MorphServe's `default`
policy in charge, greedy, `ignore_eos`; after a warm-up, `--rounds` rounds of one 64-token
generate at each `--batches` size. Per batch: the generate's seconds, the controller's mean
milliseconds a boundary over it (`boundary_us` totals in the engine's state) and the median
decision (the sample and the policy, `decision_us`: p50 of the last 2,000). With
`--profile`, Python's profiler around each boundary (it slows them several times: read where
the time goes, not how much). With `--tree DIR`, `morphserve` and `policies` are imported from
another checkout of this repository: the same machine times two versions of the controller.

    python scripts/bench_boundary.py --model MODEL_DIR --pack PACK_DIR [--rounds 2] [--tree DIR]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="the bf16 model folder")
    ap.add_argument("--pack", required=True, help="the pack prepared from it")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes, one generate each a round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the batch sizes")
    ap.add_argument("--eager", action="store_true", help="vLLM's eager mode instead of its compiled graph")
    ap.add_argument("--profile", action="store_true", help="Python's profiler around each boundary; prints the top")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose morphserve/ and policies/ are timed")
    args = ap.parse_args(argv)
    if not (args.tree / "policies").is_dir() or not (args.tree / "morphserve").is_dir():
        print(f"error: {args.tree} is not a checkout of this repository (no policies/ and morphserve/)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(args.tree.resolve()))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    import cProfile
    import pstats

    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm
    from scripts.bench_same_rung import generate_timer

    morph = {"policy": "default", **({} if args.eager else {"compile": True})}
    llm = in_process_llm(args.model, args.pack, morph=morph, enforce_eager=args.eager, max_model_len=2048,
                         max_num_seqs=max(64, max(args.batches)))
    core = engine_core_of(llm)
    import morphserve

    print(f"controller from {Path(morphserve.__file__).resolve().parent.parent}", file=sys.stderr)
    timed = generate_timer(llm)
    for b in args.batches:  # warm-up: compiled shapes, the first move, the step model's first lessons
        timed(b, 64, salt=7)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        controller = core._morphserve
        boundary = controller.on_step_boundary

        def profiled(*a, **k):
            profiler.enable()
            try:
                return boundary(*a, **k)
            finally:
                profiler.disable()

        controller.on_step_boundary = profiled
    rows: dict[int, list[tuple[float, float]]] = {b: [] for b in args.batches}
    for r in range(args.rounds):
        for b in args.batches:
            before = core.morphserve_state()["boundary_us"]
            seconds = timed(b, 64, salt=1000 * (r + 1) + b)
            after = core.morphserve_state()
            n = after["boundary_us"]["n"] - before["n"]
            rows[b].append((seconds, 1000 * (after["boundary_us"]["total_s"] - before["total_s"]) / max(n, 1)))
    state = core.morphserve_state()
    print(f"level {state['level']} of {state['max_level']}; decision p50 {state['decision_us']['p50']:.0f} us "
          f"(the sample and the policy, last {state['decision_us']['n']})")
    print("| batch | generate (s) | boundary (ms a step) |\n|---|---|---|")
    for b, vals in rows.items():
        gen, bnd = [v[0] for v in vals], [v[1] for v in vals]
        print(f"| {b} | {statistics.median(gen):.3f} [{min(gen):.3f}, {max(gen):.3f}] | "
              f"{statistics.median(bnd):.3f} [{min(bnd):.3f}, {max(bnd):.3f}] |")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())
    sys.stdout.flush()
    import os

    os._exit(0)  # skip vLLM's teardown


if __name__ == "__main__":
    sys.exit(main())
