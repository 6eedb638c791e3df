"""KV resizing on the real engine: concurrency by level, restore under load per shrink
strategy, and the memory a shrink gives back. Plain vLLM runs beside it on the same
model, prompts and memory budget.

    python scripts/bench_kv_resize.py --model MODEL_DIR --pack PACK_DIR [--out results.json]

Budget: SmolLM2's bf16 weights plus --fp16-blocks KV blocks (default 10: 3 requests of
300 + 60 tokens fit at full precision). Each child runs in its own process group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from morphserve.harness.children import emit_result, run_children  # noqa: E402
from morphserve.harness.kv_shape import kv_block_bytes  # noqa: E402
from morphserve.offline.datafiles import wikitext  # noqa: E402
from morphserve.vllm.offline_engine import (controller_of, engine_core_of, in_process_llm, kv_capacity_blocks,  # noqa: E402
                                             run_greedy, running_requests, worker_call)

PROMPT_TOKENS, MAX_TOKENS, REQUESTS = 300, 60, 24


def _prompts(model: str, n: int, salt: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(wikitext("valid").read_text()[:400_000])["input_ids"]
    return [ids[(salt * 24 + i) * 353:(salt * 24 + i) * 353 + PROMPT_TOKENS] for i in range(n)]


def _engine(model: str, pack: str | None, fp16_blocks: int):
    llm = in_process_llm(model, pack, enforce_eager=True, max_model_len=1024, max_num_seqs=32,
                         kv_cache_memory_bytes=fp16_blocks * kv_block_bytes(model, "bfloat16"))
    return llm, engine_core_of(llm)


def _run(llm, core, prompts, tag, at_step=None, action=None, max_tokens=None) -> dict:
    peak, result, restore_done = 0, None, None
    start_level = controller_of(core) and len(controller_of(core).quantized)

    def after_step(steps: int) -> None:
        nonlocal peak, result, restore_done
        peak = max(peak, running_requests(core))
        if at_step is not None and steps == at_step:
            result = action()
        if result is not None and restore_done is None and len(controller_of(core).quantized) != start_level:
            restore_done = steps

    ids = [f"{tag}{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    run = run_greedy(llm, dict(zip(ids, prompts)), dict(zip(ids, max_tokens)) if max_tokens else MAX_TOKENS,
                     after_step)
    return {"requests": len(prompts), "completed": len(run.tokens), "peak_running": peak,
            "steps": len(run.step_seconds), "seconds": time.perf_counter() - t0, "action": result,
            "restore_done_step": restore_done}


def child(mode: str, model: str, pack: str, fp16_blocks: int) -> dict:
    llm, core = _engine(model, pack if mode == "morph" else None, fp16_blocks)
    prompts = _prompts(model, REQUESTS, salt=1)
    if mode == "plain":
        return {"capacity_blocks": kv_capacity_blocks(core),
                "run": _run(llm, core, prompts, "p-")}
    ctl = controller_of(core)
    rss = lambda: worker_call(core, "morphserve_rss")  # noqa: E731
    out: dict = {"kv_blocks_by_level": ctl.kv_state()["kv_blocks_by_level"], "levels": {}, "restore": {}}
    for level in (0, 8, 15, 22, 30):
        core.morphserve_set_level(level)
        out["levels"][level] = {"capacity_blocks": ctl.pool.visible, "run": _run(llm, core, prompts, f"l{level}-"),
                                "worker_rss": rss()}
    for k, strategy in enumerate(("wait", "preempt", "migrate")):
        ctl.moves.shrink_strategy = strategy
        core.morphserve_set_level(30)
        before = rss()
        lengths = [MAX_TOKENS] * 14 + [200, 200] if strategy == "migrate" else None
        run = _run(llm, core, _prompts(model, 16, salt=2 + k), f"{strategy}-", at_step=80 if lengths else 8,
                   action=lambda: core.morphserve_set_level(0), max_tokens=lengths)
        record = ctl.recorder.recent[-1]
        out["restore"][strategy] = {"run": run, "kv": record.get("kv"), "worker_rss_before": before,
                                    "worker_rss_after": rss(), "transition_seconds": record["seconds"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the bf16 model folder")
    ap.add_argument("--pack", required=True, help="its pack from `morphserve prepare`")
    ap.add_argument("--fp16-blocks", type=int, default=10, help="KV blocks at full precision (sets the budget)")
    ap.add_argument("--out", type=Path, default=None, help="write all figures here as JSON")
    ap.add_argument("--child", choices=("plain", "morph"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.child, args.model, args.pack, args.fp16_blocks))
    results = run_children(__file__, ("plain", "morph"),
                           ["--model", args.model, "--pack", args.pack, "--fp16-blocks", str(args.fp16_blocks)],
                           "bench")
    if results is None:
        return 1
    plain, morph = results["plain"], results["morph"]
    print(f"{REQUESTS} requests of {PROMPT_TOKENS}+{MAX_TOKENS} tokens, budget = bf16 weights + {args.fp16_blocks} KV blocks")
    print(f"plain vLLM: {plain['capacity_blocks']} blocks, peak running {plain['run']['peak_running']}, "
          f"{plain['run']['seconds']:.1f} s")
    for level, r in morph["levels"].items():
        print(f"MorphServe at {level:>2} quantized layers: {r['capacity_blocks']} blocks, peak running "
              f"{r['run']['peak_running']} ({r['run']['peak_running'] / plain['run']['peak_running']:.2f}x plain), "
              f"{r['run']['seconds']:.1f} s ({plain['run']['seconds'] / r['run']['seconds']:.2f}x plain speed), "
              f"worker RSS {r['worker_rss'] / 2**20:.0f} MiB, completed {r['run']['completed']}/{r['run']['requests']}")
    for strategy, r in morph["restore"].items():
        kv = r["kv"] or {}
        print(f"restore 30 -> 0 under load, {strategy}: requested at step {8 if strategy != 'migrate' else 80}, "
              f"done at step {r['run']['restore_done_step']}; preempted {len(kv.get('preempted', []))}, "
              f"migrated {kv.get('migrated', 0)}; released {kv.get('released_blocks')} blocks, KV pages "
              f"{kv.get('kv_rss_delta', 0) / 2**20:.0f} MiB out of RSS; worker RSS "
              f"{r['worker_rss_before'] / 2**20:.0f} -> {r['worker_rss_after'] / 2**20:.0f} MiB; "
              f"completed {r['run']['completed']}/{r['run']['requests']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
