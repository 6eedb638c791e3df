"""`make demo`: MorphServe's main job on the embedded SmolLM2, end to end, in a few minutes.

1. `morphserve prepare`: the twins of the ladder `morphserve doctor` recommends for this CPU
   (GPTQ through llm-compressor: W8A8 and/or W4A16), LIS swap order, quality curves.
2. Plain vLLM serves the FP16 model and the twin statically and scores the same tokens,
   showing that the twin is exactly what vLLM's kernels compute.
3. The closed loop: `morphserve serve --policy default` under a tight memory budget takes
   a burst of requests; the policy quantizes layers, the freed memory becomes KV blocks,
   and once the burst is over everything is restored (transitions and /metrics printed).
4. `morphserve evaluate evaluations/demo.yaml`: the evaluation's own code path on 10 s of
   the azure-conv trace, plain vLLM FP16 against MorphServe `default` at the same 329 MB
   budget, one repetition (under 3 minutes; illustrative only, the suite's figures are in
   docs/RESULTS.md).

Token budgets are smaller than `prepare`'s defaults so the demo stays short; the full-size
figures are in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_PREPARE = ["--lis-tokens", "510", "--lis-window", "256", "--eval-tokens", "2046", "--eval-window", "1024"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="bf16 HF model folder (make setup builds one)")
    ap.add_argument("--out", type=Path, required=True, help="demo output folder; the pack goes in OUT/pack")
    args = ap.parse_args(argv)
    pack = args.out / "pack"
    t = time.monotonic()
    step = [sys.executable, "-m", "morphserve.cli", "prepare", str(args.model), "--out", str(pack), "--force",
            *DEMO_PREPARE]
    print(f"== 1/4 morphserve prepare ({' '.join(DEMO_PREPARE)})", flush=True)
    if subprocess.run(step, cwd=REPO).returncode != 0:
        return 1
    print("\n== 2/4 the twin against plain vLLM serving it statically (prompt_logprobs)", flush=True)
    check = [sys.executable, str(REPO / "scripts" / "vllm_perplexity.py"), str(pack),
             "--json", str(args.out / "vllm_agreement.json")]
    log = args.out / "vllm.log"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    with open(log, "w") as f:  # vLLM's engine logs are long; keep them out of the demo's output
        proc = subprocess.run(check, cwd=REPO, stderr=f, stdout=subprocess.PIPE, text=True, env=env)
    f_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("|", "tolerance"))]
    print("\n".join(f_lines))
    if proc.returncode != 0:
        print(f"vLLM check failed; its log is in {log}")
    print("\n== 3/4 a burst against `morphserve serve --policy default` (budget: bf16 weights + 10 KV blocks)",
          flush=True)
    loop = [sys.executable, str(REPO / "scripts" / "bench_policy.py"), "--model", str(args.model), "--pack", str(pack),
            "--policy", "default", "--out", str(args.out / "policy_burst.json")]
    if subprocess.run(loop, cwd=REPO, env=env).returncode != 0:
        return 1
    print("\n== 4/4 morphserve evaluate evaluations/demo.yaml: azure-conv 1640:10, plain FP16 against MorphServe "
          "default (budget 329 MB, one repetition)", flush=True)
    evaluate = [sys.executable, "-m", "morphserve.cli", "evaluate", str(REPO / "evaluations" / "demo.yaml"),
                "--model", str(args.model), "--pack", str(pack), "--out", str(args.out / "evaluate")]
    shutil.rmtree(args.out / "evaluate", ignore_errors=True)  # the pack is new: old runs do not apply
    if subprocess.run(evaluate, cwd=REPO, env=env).returncode != 0:
        return 1
    print(f"\ndemo finished in {time.monotonic() - t:.0f} s; pack in {pack}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
