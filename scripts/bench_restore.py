"""How much a 30 -> 0 restore stalls decoding: synchronous against background restores.

In-process vLLM engine with MorphServe and the pack's real W4 twin (engine core reachable,
so every step can be timed). For each mode, in one fresh process each:
  `--batch` requests decode; after `--warm-steps` steps at level L the controller starts a
  restore to 0 exactly as the policy would (`transition(0, background=...)`); every
  engine step is timed until the requests finish.
Reported: the median step before the restore, the time the restore spent inside step
boundaries (on the engine's critical path), the steps it spanned, the slowest step, and
"steps stalled" = extra time in the steps the restore touched / median step.

    python scripts/bench_restore.py --model MODEL_DIR --pack PACK_DIR [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import emit_result, run_children  # noqa: E402
from morphserve.vllm.offline_engine import controller_of, engine_core_of, in_process_llm, run_greedy  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def child(model: str, pack: str, mode: str, batch: int, tokens: int, warm_steps: int) -> dict:
    from vllm import SamplingParams

    llm = in_process_llm(model, pack, max_model_len=1024)
    core = engine_core_of(llm)
    controller = controller_of(core)
    L = controller.num_layers
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    runs = []
    for rep in range(3):
        core.morphserve_set_level(L)
        core.morphserve_set_level(None)
        levels, start = [], None

        def after_step(n: int) -> None:
            """Step 1 is the prefill; after `warm_steps` decode steps the restore starts."""
            nonlocal start
            if n > 1:
                levels.append(len(controller.quantized))
            if n == warm_steps + 1:
                t = time.perf_counter()
                controller.moves.to(0, reason="bench", background=mode == "background")
                start = (warm_steps, time.perf_counter() - t)

        # each step includes post_step: background commits happen there
        run = run_greedy(llm, {f"r{rep}-{i}": PROMPT for i in range(batch)}, tokens, after_step)
        steps = run.step_seconds[1:]  # decode steps only
        record = controller.recorder.recent[-1]
        runs.append({"steps": steps, "levels": levels, "start_index": start[0], "start_seconds": start[1],
                     "record": {k: record.get(k) for k in ("mode", "seconds", "worker_seconds", "commit_seconds",
                                                           "steps", "to")}})
    return {"mode": mode, "runs": runs}


def summarize(run: dict) -> dict:
    steps, i0 = run["steps"], run["start_index"]
    before = statistics.median(steps[:i0])
    touched = next((k for k in range(i0, len(steps)) if run["levels"][k] == 0), len(steps) - 1)
    window = steps[i0: touched + 1]
    extra = run["start_seconds"] + sum(max(0.0, s - before) for s in window)
    critical = run["start_seconds"] + (run["record"].get("commit_seconds") or 0.0)
    if run["record"]["mode"] != "background":
        critical = run["start_seconds"]
    return {"median_step_ms": 1000 * before, "restore_on_critical_path_ms": 1000 * critical,
            "steps_spanned": touched - i0 + 1, "slowest_step_ms": 1000 * max(window + [run["start_seconds"]]),
            "steps_stalled": extra / before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--batch", type=int, default=8, help="requests decoding during the restore")
    ap.add_argument("--tokens", type=int, default=96, help="output tokens per request")
    ap.add_argument("--warm-steps", type=int, default=10, help="decode steps at level L before the restore")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=("sync", "background"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.model, args.pack, args.child, args.batch, args.tokens, args.warm_steps))
    results = run_children(__file__, ("sync", "background"),
                           ["--model", args.model, "--pack", args.pack, "--batch", str(args.batch),
                            "--tokens", str(args.tokens), "--warm-steps", str(args.warm_steps)], "bench_restore")
    if results is None:
        return 1
    print("| mode | run | median step (ms) | restore on the critical path (ms) | steps spanned | "
          "slowest step (ms) | steps stalled |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        for k, run in enumerate(r["runs"]):
            s = run["summary"] = summarize(run)
            print(f"| {mode} | {k + 1} | {s['median_step_ms']:.1f} | {s['restore_on_critical_path_ms']:.1f} | "
                  f"{s['steps_spanned']} | {s['slowest_step_ms']:.1f} | {s['steps_stalled']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
