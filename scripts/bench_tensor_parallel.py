"""Transitions and step boundaries under tensor parallelism, against one rank.

For each tensor-parallel size (one fresh process and in-process engine each, MorphServe on
with the pack's real twins):
- transitions: after one warm-up round trip, `--repeats` times 0 -> L and L -> 0
  (L = every layer in the ladder's first tier), timed by the controller's own record
  (`seconds`: the whole move, workers and KV); reported as medians with their range;
- the step boundary with no transition: `--batch` requests decode `--tokens` tokens at
  level 0, once per policy in `--policies` (`none`: no policy, so the boundary holds only
  MorphServe's bookkeeping and, every few seconds, a read of every rank's memory; a policy
  that moves is reported and its steps are left out). MorphServe's own time per boundary
  (its post-step hook) is timed inside the engine step, as a share of the median step;
  what tensor parallelism adds is the difference between the sizes.

The same sizes run in turn, never two engines at once. SmolLM2-135M (9 heads, 3 KV heads)
runs at 1 and 3 ranks; where the machine has fewer NUMA nodes than ranks MorphServe
supplies the CPU lists (morphserve.runtime.thread_binding), and where it has fewer cores
than ranks the ranks share cores, which slows every step: compare the sizes on one
machine, never with another's figures.

    python scripts/bench_tensor_parallel.py --model MODEL_DIR --pack PACK_DIR [--sizes 1,3] [--repeats 3]
        [--policies none,default] [--out FILE]
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

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def child(model: str, pack: str, tp: int, repeats: int, batch: int, tokens: int, policy: str) -> dict:
    from morphserve.vllm.offline_engine import controller_of, engine_core_of, in_process_llm, run_greedy

    morph = {"policy": policy} if policy != "none" else {}
    llm = in_process_llm(model, pack, morph=morph, tensor_parallel_size=tp, max_model_len=1024)
    core = engine_core_of(llm)
    controller = controller_of(core)
    first_tier = controller.ladder.tier_names[0]
    L = max(k for k in range(controller.num_layers + 1) if set(controller.ladder.counts(k)) <= {first_tier})
    moves = {"0->L": [], "L->0": []}
    for rep in range(repeats + 1):  # the first round trip warms caches and kernels
        for name, level in (("0->L", L), ("L->0", 0)):
            result = core.morphserve_set_level(level)
            assert result["ok"] and result["changed"], result
            if rep:
                moves[name].append(result["transition"]["seconds"])
    core.morphserve_set_level(None)  # the policy takes charge again at level 0

    hook = []
    original = controller.on_step_boundary

    def timed_boundary() -> None:
        t = time.perf_counter()
        original()
        hook.append(time.perf_counter() - t)

    controller.on_step_boundary = timed_boundary
    transitions_before = controller.recorder.transitions
    levels = []
    run = run_greedy(llm, {f"r{i}": PROMPT for i in range(batch)}, tokens,
                     lambda n: levels.append(controller.moves.level))
    moved = controller.recorder.transitions - transitions_before
    steps = run.step_seconds[1:]  # decode steps (each includes its boundary)
    calm = [h for h, lv in zip(hook[1:], levels[1:]) if lv == 0]
    return {"tp": tp, "policy": policy, "L": L, "tier": first_tier, "moves": moves,
            "median_step_s": statistics.median(steps),
            "median_boundary_s": statistics.median(calm) if calm else None,
            "mean_boundary_s": statistics.fmean(calm) if calm else None, "steps": len(steps),
            "policy_transitions": moved}


def spread(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f} [{1000 * min(values):.0f}, {1000 * max(values):.0f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the served model folder (bf16 safetensors)")
    ap.add_argument("--pack", required=True, help="a pack prepared for that model (morphserve prepare)")
    ap.add_argument("--sizes", default="1,3", help="tensor-parallel sizes, comma-separated (default 1,3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed round trips per size (default 3)")
    ap.add_argument("--batch", type=int, default=4, help="requests decoding for the boundary cost (default 4)")
    ap.add_argument("--tokens", type=int, default=48, help="output tokens per request (default 48)")
    ap.add_argument("--policies", default="none,default",
                    help="policies deciding at every boundary, one run each; none: no policy (default none,default)")
    ap.add_argument("--out", type=Path, default=None, help="write every measurement here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        tp, policy = args.child.split(":")
        emit_result(child(args.model, args.pack, int(tp), args.repeats, args.batch, args.tokens, policy))
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [f"{tp}:{policy}" for policy in args.policies.split(",") for tp in sizes]
    results = run_children(__file__, runs,
                           ["--model", args.model, "--pack", args.pack, "--repeats", str(args.repeats),
                            "--batch", str(args.batch), "--tokens", str(args.tokens)], "bench_tensor_parallel")
    if results is None:
        return 1
    print("| ranks | policy | 0 -> L (ms) | L -> 0 (ms) | median decode step (ms) | MorphServe per boundary, median / "
          "mean (ms) | share of a step (mean) | policy moves |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        step, med, mean = r["median_step_s"], r["median_boundary_s"], r["mean_boundary_s"]
        share = f"{100 * mean / step:.2f}%" if mean is not None else "n/a"
        print(f"| {r['tp']} | {r['policy']} | {spread(r['moves']['0->L'])} | {spread(r['moves']['L->0'])} | "
              f"{1000 * step:.1f} | {1000 * (med or 0):.2f} / {1000 * (mean or 0):.2f} | {share} | "
              f"{r['policy_transitions']} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
