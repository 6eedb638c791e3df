"""MorphServe held at all-W8A8 against plain vLLM serving the static W8A8 checkpoint: the
same weights in the same int8 kernel, so any difference is what MorphServe's runtime adds
(its swappable layers, its step-boundary hooks, the elastic block pool), not precision.
With `--rung level0`, MorphServe held at level 0 (every layer full precision) against plain
vLLM serving the model itself in the same `--dtype`: what a server resting at level 0 pays
for being MorphServe (fp32 is the server's dtype where the CPU has no native bf16).

Each engine runs in a fresh child process, one at a time, in alternation
(static, morph, static, morph, ...) for `--rounds` rounds, so slow drift of a shared
machine lands on both. Per child, eager mode, greedy, `ignore_eos`:
- decode tok/s at batch 1, 8 and 32: (batch x 63) / (time of a 64-token generate - time of
  a 1-token generate), as scripts/bench_kernels.py measures it, best of `--repeats`
(eager unless `--compile`: then both engines run vLLM's compiled graph);
- prefill tok/s: `--prefill-batch` prompts of `--prefill-tokens` tokens, one output token;
- with `--decode-context N`: the model's forward time of a decode step at batch 1 and 8 over
  prompts of N tokens (the median over 63 steps, as vLLM itself times forwards with
  VLLM_LOG_BATCHSIZE_INTERVAL, read from its `vllm.forward_context` record): attention over long
  contexts, which the 32-token decode cells hardly exercise, without sampling or scheduling;
- with `--profile-batch B`: torch's profiler over one 64-token generate at batch B, each op's self
  CPU milliseconds per generated step (the `PROFILE_TOP` dearest of each engine, and their sum):
  where a per-step gap between the two engines lies, op by op. The profiler's own cost per op
  call lands on both engines alike, so read its figures side by side, not as absolute speed.

    python scripts/bench_same_rung.py --model MODEL_DIR --pack PACK_DIR [--kv-cache-dtype fp8] [--rounds 3]
    python scripts/bench_same_rung.py --model MODEL_DIR --pack PACK_DIR --rung level0 --dtype float32

Prints, per cell, each engine's median [range] over the rounds and the ratio morph / static
of the medians. PACK_DIR must hold a W8A8 tier.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import emit_result, run_measurement  # noqa: E402
from scripts.bench_kernels import BATCHES, decode_rates  # noqa: E402  (the same cells, measured the same way)


def _token_prompt(n: int, salt: int) -> dict:
    return {"prompt_token_ids": [(17 * i + 5 + 31 * salt) % 5000 + 100 for i in range(n)]}


def generate_timer(llm):
    """`timed(batch, tokens, prompt_tokens=32, salt=0)`: the seconds of one greedy generate of
    `batch` synthetic prompts on `llm` (ignore_eos), as `decode_rates` and the prefill cell
    time it; other benchmarks of one engine measure the same way (scripts/bench_head.py)."""
    from vllm import SamplingParams

    def timed(batch: int, tokens: int, prompt_tokens: int = 32, salt: int = 0) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        prompts = [_token_prompt(prompt_tokens, salt + i) for i in range(batch)]
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    return timed


LONG_BATCHES = (1, 8)
PROFILE_TOP = 25  # ops kept per engine: together they are nearly all of a step's CPU time
PROFILE_STEPS = 64


def op_profile(timed, batch: int) -> dict:
    """Each op's self CPU ms per step over one `PROFILE_STEPS`-token generate at `batch`
    (torch.profiler, every thread of this process: the in-process engine runs its forward
    here), the dearest `PROFILE_TOP`, and the whole generate's wall ms per step."""
    from torch.profiler import ProfilerActivity, profile

    timed(batch, PROFILE_STEPS, salt=4242)  # warm: every shape already compiled and cached
    pauses = []  # Python's garbage collections during the profiled generate: (generation, seconds)
    started = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((info["generation"], time.perf_counter() - started.pop("t")))

    gc.callbacks.append(on_gc)
    t = time.perf_counter()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            timed(batch, PROFILE_STEPS, salt=4343)
    finally:
        wall = time.perf_counter() - t
        gc.callbacks.remove(on_gc)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:PROFILE_TOP]
    return {"batch": batch, "wall_ms_per_step": 1000 * wall / PROFILE_STEPS,
            "self_ms_per_step": {e.key: e.self_cpu_time_total / 1000 / PROFILE_STEPS for e in events},
            "calls_per_step": {e.key: e.count / PROFILE_STEPS for e in events},
            # a collection scans every tracked object not frozen (gc.freeze), wherever it lands
            "gc_ms_per_step": {str(g): 1000 * sum(s for gen, s in pauses if gen == g) / PROFILE_STEPS for g in (0, 1, 2)},
            "gc_collections": {str(g): sum(1 for gen, _ in pauses if gen == g) for g in (0, 1, 2)},
            "gc_tracked_objects": len(gc.get_objects()), "gc_frozen_objects": gc.get_freeze_count()}


def long_context_forwards(timed, context: int, repeats: int) -> dict[str, float]:
    """Median forward milliseconds of a decode step at each of LONG_BATCHES over `context`-token
    prompts (fresh prompts each time: no prefix-cache hits), the best of `repeats`, from vLLM's
    own per-step-size record (on only where VLLM_LOG_BATCHSIZE_INTERVAL is set before vLLM loads)."""
    from morphserve.vllm.offline_engine import FORWARD_TIMER_ENV, recorded_forward_times

    record = recorded_forward_times()
    if record is None:
        raise SystemExit(f"--decode-context needs {FORWARD_TIMER_ENV} set before vLLM is imported")
    out = {}
    for batch in LONG_BATCHES:
        best = None
        for r in range(repeats):
            record.clear()
            timed(batch, 64, context, salt=1000 * (r + 1) + batch)
            steps = record.get(batch, [])
            if steps:
                ms = statistics.median(steps)
                best = ms if best is None else min(best, ms)
        out[str(batch)] = best
    return out


def child(mode: str, model: str, pack: str, kv_dtype: str, repeats: int, prefill_batch: int,
          prefill_tokens: int, rung: str = "w8a8", dtype: str = "bfloat16", heap_trim: float | None = None,
          decode_context: int = 0, compile: bool = False, profile_batch: int = 0,
          frontend_heap_trim: float | None = None) -> dict:
    from morphserve.evaluation.systems import static_w8a8_dir
    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm

    kw = {"enforce_eager": not compile, "max_model_len": 2048, "max_num_seqs": max(max(BATCHES), prefill_batch),
          "dtype": dtype}
    if kv_dtype != "auto":
        kw["kv_cache_dtype"] = kv_dtype
    morph = {} if heap_trim is None else {"heap_trim_interval_s": heap_trim}
    if frontend_heap_trim is not None:  # in-process, the front process's trimmer runs in the engine's own process
        morph["frontend_heap_trim_interval_s"] = frontend_heap_trim
    if compile:  # vLLM's compiled graph, MorphServe's linears through their slots
        morph["compile"] = True
    if rung == "level0":
        llm = in_process_llm(model, None if mode == "static" else pack, morph=morph, **kw)
        tiers = {dtype: "every layer (the model itself)"}
        if mode == "morph":
            core = engine_core_of(llm)
            core.morphserve_set_level(0)
            state = core.morphserve_state()
            if state["level"] != 0:
                raise SystemExit(f"MorphServe is at level {state['level']}, not 0")
            tiers = state["tier_counts"]
    elif mode == "static":
        llm = in_process_llm(static_w8a8_dir(Path(pack)), None, tokenizer=model, **kw)
        tiers = {"w8a8": "every layer (checkpoint)"}
    else:
        llm = in_process_llm(model, pack, morph=morph, **kw)
        core = engine_core_of(llm)
        state = core.morphserve_state()
        # a tiered ladder (bf16 -> W8A8 -> W4A16) is all-W8A8 halfway; a W8A8-only one at its top
        level = state["max_level"] // 2 if "w4a16" in state.get("tiers", []) else state["max_level"]
        core.morphserve_set_level(level)
        tiers = core.morphserve_state()["tier_counts"]
        if set(tiers) - {"w8a8"} and any(v for k, v in tiers.items() if k != "w8a8"):
            raise SystemExit(f"level {level} is not all-W8A8: {tiers}")

    timed = generate_timer(llm)
    decode = decode_rates(timed, repeats)
    prefill = max(prefill_batch * prefill_tokens / timed(prefill_batch, 1, prefill_tokens, salt=100 * (r + 1))
                  for r in range(repeats))  # fresh prompts each time: no prefix-cache hits
    result = {"mode": mode, "tiers": tiers, "decode_tok_s": decode, "prefill_tok_s": prefill}
    if decode_context:
        result["long_decode_forward_ms"] = long_context_forwards(timed, decode_context, repeats)
    if profile_batch:
        before = core.morphserve_state()["boundary_us"] if mode == "morph" else None
        result["profile"] = op_profile(timed, profile_batch)
        if before is not None:  # the controller's own time between steps, over the profiled generate
            after = core.morphserve_state()["boundary_us"]
            result["profile"]["boundary_ms_per_step"] = 1000 * (after["total_s"] - before["total_s"]) / max(
                after["n"] - before["n"], 1)
    return result


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def alternated(rounds: int, sides: tuple[str, ...], measure) -> dict[str, list[dict]] | int:
    """`measure(side)` for each side in turn, `rounds` times (drift of a shared machine lands
    on every side); each side's results, or an exit status after a failed child (1, its
    output printed) or Ctrl-C (130)."""
    from tqdm import tqdm

    runs: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for r in tqdm(range(rounds), desc="rounds", file=sys.stderr):
            for side in sides:
                result = measure(side)
                if result is None:
                    print(f"error: the {side} child of round {r + 1} failed (its output is above)", file=sys.stderr)
                    return 1
                runs[side].append(result)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return runs


def print_cells(first: list[dict], second: list[dict], prefill: str) -> None:
    """One table row per cell: each side's median [range] over its children, and the ratio
    of the medians (second / first)."""
    cells = [(f"decode tok/s, batch {b}", lambda x, b=b: x["decode_tok_s"][str(b)]) for b in BATCHES]
    cells.append((f"prefill tok/s, {prefill}", lambda x: x["prefill_tok_s"]))
    if all("long_decode_forward_ms" in x for x in first + second):
        cells += [(f"decode forward ms (lower is faster), batch {b}, long prompts", lambda x, b=b: x["long_decode_forward_ms"][str(b)])
                  for b in LONG_BATCHES]
    for name, get in cells:
        a, b = [get(x) for x in first], [get(x) for x in second]
        print(f"| {name} | {_summary(a)} | {_summary(b)} | {statistics.median(b) / statistics.median(a):.3f} |")


def print_profile(first: list[dict], second: list[dict]) -> None:
    """Per op, each side's self CPU ms per step (median [range] over the children; an op
    outside a child's dearest PROFILE_TOP counts 0 there), dearest on either side first,
    after the rows that are not ops (wall, time in no op, gc, the controller)."""
    def sides(get) -> tuple[list[float], list[float]]:
        return [get(x["profile"]) for x in first], [get(x["profile"]) for x in second]

    def row(name: str, get, calls=None) -> None:
        a, b = sides(get)
        counts = ("-", "-") if calls is None else tuple(f"{statistics.median(c):.0f}" for c in sides(calls))
        print(f"| {name} | {counts[0]} | {_summary(a)} | {counts[1]} | {_summary(b)} | "
              f"{statistics.median(b) - statistics.median(a):+.2f} |")

    print(f"\nself CPU ms per step at batch {first[0]['profile']['batch']} (torch profiler, {PROFILE_STEPS} steps)")
    print("| op | static calls/step | static | MorphServe calls/step | MorphServe | difference |")
    print("|---|---|---|---|---|---|")
    row("(wall, profiled)", lambda p: p["wall_ms_per_step"])
    row("(wall less every listed op's self time)", lambda p: p["wall_ms_per_step"] - sum(p["self_ms_per_step"].values()))
    for g in ("0", "1", "2"):
        row(f"(Python's gc, generation {g}: collections / ms per step)", lambda p, g=g: p["gc_ms_per_step"][g],
            calls=lambda p, g=g: p["gc_collections"][g])
    objects, frozen = sides(lambda p: p["gc_tracked_objects"]), sides(lambda p: p["gc_frozen_objects"])
    print(f"| (objects the gc tracks, frozen) | - | {statistics.median(objects[0]):.0f}, {statistics.median(frozen[0]):.0f} | - | "
          f"{statistics.median(objects[1]):.0f}, {statistics.median(frozen[1]):.0f} | - |")
    if all("boundary_ms_per_step" in x["profile"] for x in second):
        print(f"| (MorphServe's controller between steps, its own clock) | - | - | - | "
              f"{_summary([x['profile']['boundary_ms_per_step'] for x in second])} | - |")
    ops = {op for x in first + second for op in x["profile"]["self_ms_per_step"]}
    dearest = lambda op: -max(statistics.median(s) for s in sides(lambda p: p["self_ms_per_step"].get(op, 0.0)))  # noqa: E731
    for op in sorted(ops, key=dearest):
        row(op, lambda p, op=op: p["self_ms_per_step"].get(op, 0.0), calls=lambda p, op=op: p["calls_per_step"].get(op, 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, help="a pack with a W8A8 tier")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                    help="both engines' KV cache dtype (fp8: x86 with AVX-512 or AMX; default auto = bf16)")
    ap.add_argument("--rung", choices=("w8a8", "level0"), default="w8a8",
                    help="w8a8 (default): MorphServe at all-W8A8 against the static W8A8 checkpoint; level0: "
                         "MorphServe at level 0 against plain vLLM on the model itself")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="both engines' dtype (float32 where the CPU has no native bf16; default bfloat16)")
    ap.add_argument("--heap-trim-interval", type=float, default=None,
                    help="MorphServe's heap trimmer interval in seconds (0 = off; default: MorphServe's own)")
    ap.add_argument("--frontend-heap-trim-interval", type=float, default=None,
                    help="MorphServe's front-process heap trimmer interval in seconds (0 = off; default: MorphServe's "
                         "own). In-process, the front process is the engine's own: its thread trims the engine's heap")
    ap.add_argument("--rounds", type=int, default=3, help="alternating static/morph rounds (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="timings per cell within a child; the best is kept")
    ap.add_argument("--prefill-batch", type=int, default=8, help="prompts in the prefill cell (default 8)")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="tokens per prompt in the prefill cell")
    ap.add_argument("--decode-context", type=int, default=0, metavar="N",
                    help="also time decode forwards at batch 1 and 8 over N-token prompts (vLLM's own forward "
                         "timer; default 0: not measured)")
    ap.add_argument("--compile", action="store_true",
                    help="both engines run vLLM's compiled CPU graph (plain vLLM's default; MorphServe's --compile); "
                         "default: both eager")
    ap.add_argument("--profile-batch", type=int, default=0, metavar="B",
                    help="also profile one 64-token generate at batch B per child (torch profiler; each op's self "
                         "CPU ms per step, engine against engine; default 0: not profiled)")
    ap.add_argument("--out", type=Path, default=None, help="also write every child's figures here as JSON")
    ap.add_argument("--child", choices=("static", "morph"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.child, args.model, args.pack, args.kv_cache_dtype, args.repeats,
                          args.prefill_batch, args.prefill_tokens, args.rung, args.dtype, args.heap_trim_interval,
                          args.decode_context, args.compile, args.profile_batch, args.frontend_heap_trim_interval))
    common = ["--model", args.model, "--pack", args.pack, "--kv-cache-dtype", args.kv_cache_dtype,
              "--rung", args.rung, "--dtype", args.dtype,
              *(["--heap-trim-interval", repr(args.heap_trim_interval)] if args.heap_trim_interval is not None else []),
              *(["--frontend-heap-trim-interval", repr(args.frontend_heap_trim_interval)]
                if args.frontend_heap_trim_interval is not None else []),
              "--repeats", str(args.repeats), "--prefill-batch", str(args.prefill_batch),
              "--prefill-tokens", str(args.prefill_tokens), "--decode-context", str(args.decode_context),
              "--profile-batch", str(args.profile_batch),
              *(["--compile"] if args.compile else [])]
    if args.decode_context:  # vLLM reads it once, as it loads: the children inherit it
        from morphserve.vllm.offline_engine import FORWARD_TIMER_ENV

        os.environ.setdefault(FORWARD_TIMER_ENV, "1e9")  # record every forward, never log
    runs = alternated(args.rounds, ("static", "morph"),
                      lambda mode: run_measurement([sys.executable, __file__, "--child", mode, *common]))
    if isinstance(runs, int):
        return runs
    print(f"{'compiled' if args.compile else 'eager'}, KV cache dtype {args.kv_cache_dtype}, dtype {args.dtype}; medians [range] over {args.rounds} rounds; "
          f"MorphServe tiers: {runs['morph'][0]['tiers']}")
    if args.rung == "level0":
        print("| cell | plain vLLM | MorphServe at level 0 | morph / plain |")
    else:
        print("| cell | static W8A8 (plain vLLM) | MorphServe at all-W8A8 | morph / static |")
    print("|---|---|---|---|")
    print_cells(runs["static"], runs["morph"], f"{args.prefill_batch} x {args.prefill_tokens}")
    if args.profile_batch:
        print_profile(runs["static"], runs["morph"])
    if args.out:
        args.out.write_text(json.dumps({"compile": args.compile, "kv_cache_dtype": args.kv_cache_dtype, "rung": args.rung, "dtype": args.dtype,
                                        "heap_trim_interval": args.heap_trim_interval,
                                        "frontend_heap_trim_interval": args.frontend_heap_trim_interval, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
