"""Identity twins under tensor parallelism: levels flipped mid-request change nothing.

The identity twin computes exactly what bf16 computes through the whole swap path (drop
vLLM's prepacked closure, install another, re-prepack on restore), on every rank's shard.
With `--ranks` workers, requests decode while the level flips every third engine step;
the greedy tokens must equal plain vLLM's at the same size (same prompts, same schedule:
every request is added before the first step). Exits 1 on any difference.

One fresh process per engine (plain vLLM first, then MorphServe), never two at once. Where
the machine has fewer NUMA nodes than ranks, both get the CPU lists MorphServe supplies
(morphserve.runtime.thread_binding).

    python scripts/check_tensor_parallel.py --model MODEL_DIR --pack PACK_DIR [--ranks 3] [--tokens 24]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import emit_result, run_children  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "To make a cup of tea, first", "import numpy as np\n"]


def child(model: str, pack: str, system: str, ranks: int, tokens: int) -> dict:
    from morphserve.runtime import thread_binding
    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm, run_greedy

    thread_binding.supply(os.environ, ranks)  # the plain engine gets what MorphServe's would
    if system == "plain":
        llm = in_process_llm(model, None, tensor_parallel_size=ranks, enforce_eager=True, max_model_len=1100)
        run = run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, tokens)
        return {"tokens": [run.tokens[str(i)] for i in range(len(PROMPTS))], "flips": 0}
    llm = in_process_llm(model, pack, twin="identity", tensor_parallel_size=ranks, max_model_len=1100)
    core = engine_core_of(llm)
    top = core.morphserve_state()["max_level"]
    levels = [top // 2, top, 0, top // 4, top, 3 * top // 4, 0, 3]
    flips = 0

    def flip_every_third_step(steps: int) -> None:
        nonlocal flips
        if steps % 3 == 0:
            running = len(core.scheduler.running)
            result = core.morphserve_set_level(levels[(steps // 3) % len(levels)])
            if not result["ok"]:
                raise RuntimeError(result["error"])
            flips += running > 0 and result["changed"]

    run = run_greedy(llm, {str(i): p for i, p in enumerate(PROMPTS)}, tokens, flip_every_third_step)
    return {"tokens": [run.tokens[str(i)] for i in range(len(PROMPTS))], "flips": flips}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the served model folder (bf16 safetensors)")
    ap.add_argument("--pack", required=True, help="a pack prepared for that model (its twins are not used)")
    ap.add_argument("--ranks", type=int, default=3,
                    help="tensor-parallel size; must divide the model's heads (default 3)")
    ap.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt (default 24)")
    ap.add_argument("--child", choices=("plain", "identity"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.model, args.pack, args.child, args.ranks, args.tokens))
    results = run_children(__file__, ("plain", "identity"),
                           ["--model", args.model, "--pack", args.pack, "--ranks", str(args.ranks),
                            "--tokens", str(args.tokens)], "check_tensor_parallel")
    if results is None:
        return 1
    plain, ours = results["plain"]["tokens"], results["identity"]["tokens"]
    same = sum(a == b for a, b in zip(plain, ours))
    print(f"{args.ranks} ranks: {results['identity']['flips']} level flips with requests running; "
          f"{same} of {len(PROMPTS)} outputs equal plain vLLM's token for token")
    return 0 if same == len(PROMPTS) and results["identity"]["flips"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
