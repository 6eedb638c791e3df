"""Swap-latency and overhead benchmark for runtime layer swapping (CPU, real vLLM engine).

Runs, each in its own fresh process, one after the other on the same machine:
  1. plain vLLM (no plugin loaded): steady-state decode throughput;
  2. MorphServe active, no transitions: the same workload (the overhead figure);
  3. MorphServe: per-layer swap latency, whole transitions (0 <-> L/4, L/2, L), and the
     decode-step time at level 0 and level L, for scale.

    python scripts/bench_swap.py --model MODEL_DIR --pack PACK_DIR [--out results.json]
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
from morphserve.vllm.offline_engine import engine_core_of, in_process_llm, run_greedy  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def _throughput(llm, batch: int, tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT] * batch, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate([PROMPT] * batch, params, use_tqdm=False)
        rates.append(batch * tokens / (time.perf_counter() - t))
    return {"batch": batch, "tokens": tokens, "tok_s_runs": rates, "tok_s_median": statistics.median(rates)}


def _decode_step_ms(llm, batch: int) -> float:
    prompts = {f"s{time.monotonic_ns()}-{i}": PROMPT for i in range(batch)}
    times = run_greedy(llm, prompts, 48).step_seconds[1:]  # the first step is the prefill
    return 1000 * statistics.median(times)


def child(mode: str, model: str, pack: str, batch: int, tokens: int, repeats: int, dtype: str) -> dict:
    # plain: no pack, so no general plugin loads at all
    llm = in_process_llm(model, None if mode == "plain" else pack, enforce_eager=True, max_model_len=1024, dtype=dtype)
    result = {"mode": mode, "throughput": _throughput(llm, batch, tokens, repeats)}
    if mode != "swap":
        return result
    core = engine_core_of(llm)
    L = core.morphserve_state()["swappable_layers"]
    per_layer_q, per_layer_r = [], []
    for _ in range(20):
        per_layer_q.append(core.morphserve_set_level(1)["transition"]["worker_seconds"])
        per_layer_r.append(core.morphserve_set_level(0)["transition"]["worker_seconds"])
    result["per_layer_ms"] = {"quantize": 1000 * statistics.median(per_layer_q),
                              "restore": 1000 * statistics.median(per_layer_r)}
    transitions = {}
    for k in sorted({L // 4, L // 2, L}):
        q, r = [], []
        for _ in range(5):
            q.append(core.morphserve_set_level(k)["transition"]["seconds"])
            r.append(core.morphserve_set_level(0)["transition"]["seconds"])
        transitions[str(k)] = {"quantize_ms": 1000 * statistics.median(q), "restore_ms": 1000 * statistics.median(r)}
    result["transition_ms"] = transitions
    result["decode_step_ms"] = {"level_0": _decode_step_ms(llm, batch)}
    core.morphserve_set_level(L)
    result["decode_step_ms"][f"level_{L}"] = _decode_step_ms(llm, batch)
    core.morphserve_set_level(0)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the model directory (safetensors, as vLLM loads it)")
    ap.add_argument("--pack", required=True, help="a pack from `morphserve prepare` for that model")
    ap.add_argument("--batch", type=int, default=8, help="concurrent requests in the throughput workload (default 8)")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per request (default 64)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="throughput runs per process; the report gives their median (default 3)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the engines' dtype, plain and MorphServe alike (default bfloat16; float32 is the fast one "
                         "where the CPU has no bf16 instructions)")
    ap.add_argument("--out", type=Path, default=None, help="write all figures here as JSON")
    ap.add_argument("--child", choices=("plain", "morph", "swap"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.child, args.model, args.pack, args.batch, args.tokens, args.repeats, args.dtype))
    results = run_children(__file__, ("plain", "morph", "swap"),
                           ["--model", args.model, "--pack", args.pack, "--batch", str(args.batch),
                            "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--dtype", args.dtype],
                           "bench")
    if results is None:
        return 1
    plain = results["plain"]["throughput"]["tok_s_median"]
    morph = results["morph"]["throughput"]["tok_s_median"]
    swap = results["swap"]
    print(f"steady-state decode, batch {args.batch} x {args.tokens} tokens (median of {args.repeats}):")
    print(f"  plain vLLM {plain:.1f} tok/s | MorphServe active, level 0 {morph:.1f} tok/s | ratio {morph / plain:.3f}")
    print(f"per-layer swap (median of 20): quantize {swap['per_layer_ms']['quantize']:.2f} ms, "
          f"restore {swap['per_layer_ms']['restore']:.2f} ms")
    print("whole transitions (median of 5):")
    for k, v in swap["transition_ms"].items():
        print(f"  0 -> {k}: {v['quantize_ms']:.1f} ms | {k} -> 0: {v['restore_ms']:.1f} ms")
    print("decode step (median, batch %d): " % args.batch
          + ", ".join(f"{k} {v:.1f} ms" for k, v in swap["decode_step_ms"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
