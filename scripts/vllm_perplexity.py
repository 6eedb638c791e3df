"""Perplexity as plain vLLM computes it (prompt_logprobs), beside a pack's own numbers.

This is the check that the twin in a pack is exactly what vLLM's kernels compute: vLLM
serves the FP16 model and the pack's base twin (W4A16, or W8A8 in a W8A8-only pack)
*statically*, scores the same token windows that `prepare` scored (read back from
quality.json), and the script reports the relative gap to `prepare`'s FP16 and
all-quantized perplexities.

    python scripts/vllm_perplexity.py PACK_DIR [--tolerance 0.01] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.offline import pack as packfmt  # noqa: E402
from morphserve.vllm.kernels import W4A16_ENV  # noqa: E402
from morphserve.vllm.perplexity import perplexity_of  # noqa: E402
from quant_layers.eval_windows import load_windows  # noqa: E402


def vllm_perplexity(model: str, windows: list[list[int]], kv_gib: int = 1) -> tuple[float, int, float]:
    """Run vLLM in-process on `windows`; return (perplexity, scored tokens, seconds)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    os.environ.update(W4A16_ENV)  # the 4-bit kernel MorphServe serves and prepare's curve measures
    from vllm import LLM

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=max(len(w) for w in windows) + 8,
              seed=0)
    t = time.monotonic()
    ppl, count = perplexity_of(llm, windows)
    elapsed = time.monotonic() - t
    del llm
    return ppl, count, elapsed


def _tier_label(manifest) -> str:
    """The base twin as the table names it: a W8A8-only pack's twin is int8 weights and activations."""
    if manifest.base_tier == "w8a8":
        return "W8A8 int8"
    return f"W{manifest.bits}A16 g{manifest.group_size}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack", type=Path, help="a pack written by `morphserve prepare`")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="largest relative perplexity gap accepted between prepare and vLLM")
    ap.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    manifest = packfmt.load_manifest(args.pack)
    quality = json.loads((args.pack / packfmt.QUALITY).read_text())
    tokenizer = AutoTokenizer.from_pretrained(manifest.model_path)
    windows = load_windows(Path(quality["eval_text"]), tokenizer, quality["window"], quality["tokens"])
    assert windows.scored_tokens == quality["tokens"], "window plan drifted from quality.json"

    rows = []
    for label, model, ours in (
        ("FP16 (bf16)", manifest.model_path, quality["fp16_ppl"]),
        (f"{_tier_label(manifest)}, all layers", str(args.pack / manifest.quantized_dir),
         quality["all_quantized_ppl"]),
    ):
        ppl, count, secs = vllm_perplexity(model, windows.windows)
        rows.append({"config": label, "prepare_ppl": ours, "vllm_ppl": ppl, "tokens": count,
                     "rel_gap": ppl / ours - 1.0, "vllm_seconds": round(secs, 1)})
    ok = all(abs(r["rel_gap"]) <= args.tolerance for r in rows)
    print(f"| config | prepare (own code) | vLLM static (prompt_logprobs) | gap | tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['prepare_ppl']:.3f} | {r['vllm_ppl']:.3f} | {r['rel_gap']:+.2%} | {r['tokens']} |")
    print(f"tolerance {args.tolerance:.1%}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"tolerance": args.tolerance, "ok": ok, "rows": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
