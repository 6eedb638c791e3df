"""What vLLM's FP8 KV cache costs in perplexity, which a pack's quality curve cannot say.

The evaluation reads each system's quality off the pack's curve, which measures weights
only, so a system with `kv_cache_dtype: fp8` is charged as if its KV were bf16. This script
measures the difference: plain vLLM scores the pack's evaluation windows (the tokens
`prepare` scored) with a bf16 and an FP8 KV cache, for the bf16 model and the pack's W8A8
twin. Prefill is chunked (`--chunk` tokens per step), so every chunk after the first
attends to the earlier ones *through the KV cache*, as decoding does; one unchunked pass
would attend to its own bf16 keys and values and never read the cache.

    python scripts/fp8_kv_quality.py PACK_DIR [--chunk 128] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.errors import MorphServeError  # noqa: E402
from morphserve.offline import pack as packfmt  # noqa: E402
from quant_layers.eval_windows import load_windows  # noqa: E402
from morphserve.vllm.perplexity import perplexity_of  # noqa: E402


def chunked_perplexity(model: str, tokenizer: str, windows: list[list[int]], kv_dtype: str,
                       chunk: int) -> tuple[float, float]:
    """(perplexity, seconds) of `windows` under plain vLLM with `kv_dtype` KV, prefilled in chunks."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(model=model, tokenizer=tokenizer, dtype="bfloat16", enforce_eager=True, seed=0,
              max_model_len=max(len(w) for w in windows) + 8, kv_cache_dtype=kv_dtype,
              enable_chunked_prefill=True, max_num_batched_tokens=chunk, max_num_seqs=1,
              enable_prefix_caching=False)
    t = time.monotonic()
    ppl, _ = perplexity_of(llm, windows)
    elapsed = time.monotonic() - t
    del llm
    return ppl, elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack", type=Path, help="a pack written by `morphserve prepare` (with a W8A8 tier for its row)")
    ap.add_argument("--chunk", type=int, default=128,
                    help="prefill tokens per engine step (default 128: vLLM's CPU KV block size)")
    ap.add_argument("--windows", type=int, default=None,
                    help="score only the first N evaluation windows (default: all of them)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    if not (args.pack / packfmt.MANIFEST).exists():
        raise SystemExit(f"error: {args.pack} is not a pack (no {packfmt.MANIFEST})")

    from transformers import AutoTokenizer

    from morphserve.vllm.platform_facts import fp8_kv_problem

    manifest = packfmt.load_manifest(args.pack)
    config = json.loads((Path(manifest.model_path) / "config.json").read_text())
    problem = fp8_kv_problem(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if problem:
        raise SystemExit(f"error: vLLM refuses an FP8 KV cache here: {problem}")
    quality = json.loads((args.pack / packfmt.QUALITY).read_text())
    tokenizer = AutoTokenizer.from_pretrained(manifest.model_path)
    windows = load_windows(Path(quality["eval_text"]), tokenizer, quality["window"], quality["tokens"]).windows
    windows = windows[: args.windows] if args.windows else windows
    models = [("bf16", manifest.model_path)]
    w8 = manifest.tier("w8a8")
    if w8 is not None:
        models.append(("W8A8", str(args.pack / w8.quantized_dir)))
    elif manifest.base_tier == "w8a8":
        models.append(("W8A8", str(args.pack / manifest.quantized_dir)))
    rows = []
    for label, model in models:
        base, t_base = chunked_perplexity(model, manifest.model_path, windows, "auto", args.chunk)
        fp8, t_fp8 = chunked_perplexity(model, manifest.model_path, windows, "fp8", args.chunk)
        rows.append({"weights": label, "ppl_bf16_kv": base, "ppl_fp8_kv": fp8, "fp8_kv_increase": fp8 / base - 1,
                     "windows": len(windows), "tokens_per_window": len(windows[0]), "chunk": args.chunk,
                     "seconds": round(t_base + t_fp8, 1)})
    print(f"| weights | perplexity, bf16 KV | perplexity, FP8 KV | FP8 KV's increase | windows x tokens, chunk |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['ppl_bf16_kv']:.3f} | {r['ppl_fp8_kv']:.3f} | {r['fp8_kv_increase']:+.2%} | "
              f"{r['windows']} x {r['tokens_per_window']}, {r['chunk']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MorphServeError as e:
        raise SystemExit(f"error: {e}")
