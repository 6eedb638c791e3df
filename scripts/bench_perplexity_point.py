"""What one perplexity point of `prepare`'s quality curves costs, and where the time goes.

`prepare` measures about a hundred points on a tiered pack (the W4A16 curve, the paper's
two baseline orders, the ladder), each a forward of the evaluation windows from the first
layer whose tier changed, then the LM head and the loss. This times such points on a
pack's real twins with the same instrument (`SwitchableModel.nll`): one layer in the middle
switched (about half the layers rerun) and one near the front (nearly all of them), each
`--repeats` times, and reports the median seconds per point, with the loss computed as
`prepare` does now (a chunk of positions at a time) and, for comparison, over all the
logits at once as before. Both ways then measure the bf16 perplexity: they must agree.

    python scripts/bench_perplexity_point.py --model MODEL_DIR --pack PACK_DIR [--tokens 8184] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.offline import pack as packfmt  # noqa: E402
from morphserve.offline.prepare import DEFAULT_EVAL, W8_DIR, _tokenizer, compute_dtype  # noqa: E402
from quant_layers.eval_windows import load_windows, perplexity  # noqa: E402
from quant_layers.layer_runner import SwitchableModel  # noqa: E402
from quant_layers.model_info import read_model_info  # noqa: E402
from quant_layers.twin import open_twin  # noqa: E402
from quant_layers.w8_twin import open_w8_twin  # noqa: E402


def whole_logits_nll(model: SwitchableModel, hidden: torch.Tensor, target: torch.Tensor) -> float:
    """The loss as `prepare` computed it before: one cross-entropy over every logit."""
    logits = model.model.lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             reduction="sum").item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the bf16 model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, type=Path, help="a pack with a W4A16 tier (and W8A8, if it has one)")
    ap.add_argument("--tokens", type=int, default=8184, help="scored evaluation tokens (prepare's default)")
    ap.add_argument("--repeats", type=int, default=3, help="times each point is measured")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = ap.parse_args()

    manifest = packfmt.load_manifest(args.pack)
    info = read_model_info(args.model)
    tw = open_twin(args.pack / manifest.quantized_dir, info)
    w8 = open_w8_twin(args.pack / W8_DIR, info) if manifest.tier("w8a8") is not None else None
    dtype = compute_dtype("auto")
    model = SwitchableModel(args.model, lambda i: tw.dequantized_layer(i, torch.bfloat16), info.num_layers,
                            tiers={"w8a8": lambda i: w8.dequantized_layer(i, torch.bfloat16)} if w8 else None,
                            act_quant_tiers=frozenset({"w8a8"}) if w8 else frozenset(), compute_dtype=dtype)
    windows = load_windows(DEFAULT_EVAL, _tokenizer(args.model), 1024, args.tokens)
    model.nll(windows)  # the first point runs every layer and fills the cache of layer inputs
    middle, front = info.num_layers // 2, 1
    chunked = model._token_nll
    results = {}
    for name, loss in (("chunked", chunked), ("whole logits", lambda h, t: whole_logits_nll(model, h, t))):
        model._token_nll = loss
        for label, layer in (("middle layer", middle), ("front layer", front)):
            times = []
            for _ in range(args.repeats):
                config = dict(model.config)
                config[layer] = None if config.get(layer) else "base"  # flip it: the next point
                model.set_config({k: v for k, v in config.items() if v})
                t = time.perf_counter()
                model.nll(windows)
                times.append(time.perf_counter() - t)
            results[f"{name}, {label}"] = {"median_s": statistics.median(times), "min_s": min(times),
                                           "max_s": max(times)}
            print(f"{name:13s} {label:13s} median {statistics.median(times):6.2f} s "
                  f"[{min(times):.2f}, {max(times):.2f}]", flush=True)
    model.set_quantized(())
    for name, loss in (("chunked", chunked), ("whole logits", lambda h, t: whole_logits_nll(model, h, t))):
        model._token_nll = loss
        results[f"{name}, bf16 perplexity"] = perplexity(*model.nll(windows))
        print(f"{name:13s} bf16 perplexity {results[f'{name}, bf16 perplexity']:.6f}", flush=True)
    model._token_nll = chunked
    if args.out:
        args.out.write_text(json.dumps({"pack": str(args.pack), "tokens": windows.scored_tokens,
                                        "compute_dtype": str(dtype), "points": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
