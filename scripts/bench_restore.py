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
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_swap import _run_child  # noqa: E402  (runs a vLLM child in its own group and reaps it)
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def child(model: str, pack: str, mode: str, batch: int, tokens: int, warm_steps: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, seed=0,
              additional_config={"morphserve": {"pack": pack}})
    core = llm.llm_engine.engine_core.engine_core
    controller = core._morphserve
    engine = llm.llm_engine
    L = controller.num_layers
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    runs = []
    for rep in range(3):
        core.morphserve_set_level(L)
        core.morphserve_set_level(None)
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{rep}-{i}", PROMPT, params)
        engine.step()  # prefill
        steps, levels, start = [], [], None
        while engine.has_unfinished_requests():
            if len(steps) == warm_steps:
                t = time.perf_counter()
                controller.moves.to(0, reason="bench", background=mode == "background")
                start = (len(steps), time.perf_counter() - t)
            t = time.perf_counter()
            engine.step()  # includes post_step: background commits happen here
            steps.append(time.perf_counter() - t)
            levels.append(len(controller.quantized))
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
        result = child(args.model, args.pack, args.child, args.batch, args.tokens, args.warm_steps)
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # skip vLLM's CPU engine teardown, which can abort in C++ after the work is done
    results = {}
    for mode in ("sync", "background"):
        print(f"[bench_restore] {mode} ...", file=sys.stderr, flush=True)
        text, returncode = _run_child([sys.executable, __file__, "--child", mode, "--model", args.model,
                                       "--pack", args.pack, "--batch", str(args.batch), "--tokens", str(args.tokens),
                                       "--warm-steps", str(args.warm_steps)])
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        if returncode != 0 or line is None:
            print(text[-3000:], file=sys.stderr)
            return 1
        results[mode] = json.loads(line[len("RESULT "):])
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
