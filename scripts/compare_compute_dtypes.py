"""Do `prepare`'s quality curves depend on its offline arithmetic (bf16 or fp32)?

`prepare` computes its perplexity curves in fp32 where bf16 is slow (`--compute-dtype
auto`), on weights holding exactly the bf16 values. This measures the same points of a
pack's W4A16 curve (its LIS order, k layers quantized) both ways, with the instrument
`prepare` uses (`SwitchableModel.nll`), on the same evaluation tokens, and prints each
point's perplexity in both, their relative difference, and the difference of the curve's
relative increase (what the policy's quality budget reads).

    python scripts/compare_compute_dtypes.py --model MODEL_DIR --pack PACK_DIR [--tokens 8184] [--points 0,5,10,15,20,25,30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.offline import pack as packfmt  # noqa: E402
from morphserve.offline.prepare import DEFAULT_EVAL, _tokenizer  # noqa: E402
from quant_layers.eval_windows import load_windows, perplexity  # noqa: E402
from quant_layers.layer_runner import SwitchableModel  # noqa: E402
from quant_layers.model_info import read_model_info  # noqa: E402
from quant_layers.twin import open_twin  # noqa: E402


def curve(model: SwitchableModel, windows, order: list[int], points: list[int], label: str) -> dict[int, float]:
    out = {}
    for k in tqdm(points, desc=f"perplexity ({label})", file=sys.stderr):
        model.set_quantized(order[:k])
        out[k] = perplexity(*model.nll(windows))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the bf16 model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, type=Path, help="a pack with a W4A16 tier")
    ap.add_argument("--tokens", type=int, default=8184, help="scored evaluation tokens (prepare's default)")
    ap.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (prepare's default)")
    ap.add_argument("--points", default="0,5,10,15,20,25,30", help="layer counts k of the W4A16 LIS order to measure")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()

    manifest = packfmt.load_manifest(args.pack)
    if manifest.base_tier != "w4a16":
        sys.exit(f"error: {args.pack} has no W4A16 tier to compare on")
    info = read_model_info(args.model)
    points = sorted({int(p) for p in args.points.split(",") if p.strip()})
    if not points or points[0] < 0 or points[-1] > info.num_layers:
        sys.exit(f"error: --points must lie in 0..{info.num_layers}")
    tw = open_twin(args.pack / manifest.quantized_dir, info)
    windows = load_windows(DEFAULT_EVAL, _tokenizer(args.model), args.window, args.tokens)
    curves, seconds = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        label = str(dtype).removeprefix("torch.")
        model = SwitchableModel(args.model, lambda i: tw.dequantized_layer(i, torch.bfloat16), info.num_layers,
                                compute_dtype=dtype)
        t = time.perf_counter()
        curves[label] = curve(model, windows, manifest.swap_order, points, label)
        seconds[label] = time.perf_counter() - t
        del model
    bf, fp = curves["bfloat16"], curves["float32"]
    print(f"{windows.scored_tokens} scored tokens; seconds: bf16 {seconds['bfloat16']:.0f}, fp32 {seconds['float32']:.0f}")
    print("| k | bf16 ppl | fp32 ppl | relative difference | increase bf16 | increase fp32 | difference (pp) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for k in points:
        inc_b, inc_f = bf[k] / bf[points[0]] - 1, fp[k] / fp[points[0]] - 1
        rows.append({"k": k, "bf16": bf[k], "fp32": fp[k], "relative_difference": fp[k] / bf[k] - 1,
                     "increase_bf16": inc_b, "increase_fp32": inc_f})
        print(f"| {k} | {bf[k]:.4f} | {fp[k]:.4f} | {100 * (fp[k] / bf[k] - 1):+.3f}% | {100 * inc_b:+.2f}% "
              f"| {100 * inc_f:+.2f}% | {100 * (inc_f - inc_b):+.2f} |")
    worst = max(abs(r["relative_difference"]) for r in rows)
    print(f"largest relative difference of perplexity: {100 * worst:.3f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pack": str(args.pack), "tokens": windows.scored_tokens, "rows": rows,
                                        "seconds": seconds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
