"""Prefill and decode time of one engine per dtype (bf16, fp32), plain vLLM and optionally
MorphServe at its top level, on the same prompts: how much a CPU without bf16 instructions
gains by serving in fp32, and what it pays in memory.

Each (system, dtype) runs in its own fresh process, one after the other. In each, after a
warm-up, `--repeats` rounds of: prefill the prompts (one output token each), then decode
`--tokens` tokens for the same prompts (prefill included, so decode time = that minus the
prefill). The report gives medians with [min, max].

    python scripts/bench_dtype.py --model MODEL_DIR [--pack PACK_DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.evaluation.aggregate import spread  # noqa: E402
from morphserve.harness.children import emit_result, run_children  # noqa: E402
from morphserve.runtime.layer_set import rss_bytes  # noqa: E402
from morphserve.vllm.offline_engine import engine_core_of, in_process_llm  # noqa: E402

DTYPES = ("bfloat16", "float32")


def _prompts(model: str, n: int, length: int) -> list[dict]:
    from transformers import AutoTokenizer

    from morphserve.offline.datafiles import wikitext

    ids = AutoTokenizer.from_pretrained(model)(wikitext("valid").read_text()[:400_000])["input_ids"]
    if (n - 1) * 353 + length > len(ids):
        raise SystemExit(f"error: {n} prompts of {length} tokens do not fit the evaluation text")
    return [{"prompt_token_ids": ids[i * 353:i * 353 + length]} for i in range(n)]  # disjoint: no prefix reuse


def child(mode: str, model: str, pack: str | None, n: int, length: int, tokens: int, repeats: int) -> dict:
    from vllm import SamplingParams

    system, dtype = mode.split(":")
    llm = in_process_llm(model, pack if system == "morph" else None, enforce_eager=True, dtype=dtype,
                         max_model_len=length + tokens + 8, max_num_seqs=max(n, 1),
                         kv_cache_memory_bytes=512 * 2**20)
    level = 0
    if system == "morph":
        core = engine_core_of(llm)
        level = core.morphserve_state()["swappable_layers"]
        core.morphserve_set_level(level)
    prompts = _prompts(model, n, length)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        prefill.append(time.perf_counter() - t)
        llm.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate(prompts, many, use_tqdm=False)
        decode.append(time.perf_counter() - t - prefill[-1])
    return {"system": system, "dtype": dtype, "level": level, "prefill_s": prefill, "decode_s": decode,
            "rss_mib": rss_bytes() / 2**20}


def _spread(xs: list[float]) -> str:
    s = spread(xs)
    return f"{s.median:.2f} [{s.low:.2f}, {s.high:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the model directory (safetensors, as vLLM loads it)")
    ap.add_argument("--pack", default=None,
                    help="also run MorphServe with this pack, every layer quantized (default: plain vLLM only)")
    ap.add_argument("--prompts", type=int, default=12, help="prompts per round, all in one batch (default 12)")
    ap.add_argument("--prompt-tokens", type=int, default=300, help="tokens per prompt (default 300)")
    ap.add_argument("--tokens", type=int, default=60, help="decode tokens per prompt (default 60)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per process; medians and ranges over them (default 3)")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help="comma-separated dtypes to run (default bfloat16,float32; float32 alone where bf16 is "
                         "emulated and only the fp32 figures are wanted)")
    ap.add_argument("--out", type=Path, default=None, help="write all figures here as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shared = [str(args.prompts), str(args.prompt_tokens), str(args.tokens), str(args.repeats)]
    if args.child:
        emit_result(child(args.child, args.model, args.pack, *map(int, shared)))
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - set(DTYPES):
        print(f"error: --dtypes {args.dtypes!r}: choose from {','.join(DTYPES)}", file=sys.stderr)
        return 2
    modes = [f"plain:{d}" for d in dtypes] + ([f"morph:{d}" for d in dtypes] if args.pack else [])
    extra = ["--pack", args.pack] if args.pack else []
    results = run_children(__file__, modes, ["--model", args.model, *extra, "--prompts", shared[0],
                                             "--prompt-tokens", shared[1], "--tokens", shared[2],
                                             "--repeats", shared[3]], "dtype")
    if results is None:
        return 1
    print(f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.tokens} decode tokens, "
          f"median [min, max] of {args.repeats} (seconds):")
    for mode, r in results.items():
        print(f"  {r['system']:5} level {r['level']:>2} {r['dtype']:8}: prefill {_spread(r['prefill_s'])} | "
              f"decode {_spread(r['decode_s'])} | RSS {r['rss_mib']:.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
