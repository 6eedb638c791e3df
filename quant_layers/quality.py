"""Quality curves: perplexity against how many layers are quantized, for several orders.

The LIS order is measured at every k = 0..L, because the runtime may stop at any level.
Front-to-back and back-to-front are the paper's baselines, measured at k = L/4, L/2,
3L/4 and L. k = 0 and k = L are the same model whatever the order, so they are measured
once and shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from quant_layers.eval_windows import Windows, perplexity


def checkpoints(num_layers: int) -> list[int]:
    return sorted({num_layers // 4, num_layers // 2, (3 * num_layers) // 4, num_layers})


def quality_curves(model, windows: Windows, lis_order: list[int], eval_text: Path, window: int) -> dict:
    L = len(lis_order)
    orders = {
        "lis": list(lis_order),
        "front_to_back": list(range(L)),
        "back_to_front": list(range(L - 1, -1, -1)),
    }
    plan = [("lis", k) for k in range(L + 1)]
    plan += [(name, k) for name in ("front_to_back", "back_to_front") for k in checkpoints(L) if k not in (0, L)]
    measured: dict[frozenset[int], float] = {}
    curves: dict[str, dict[str, float]] = {name: {} for name in orders}
    for name, k in tqdm(plan, desc="perplexity", file=sys.stderr):
        layers = frozenset(orders[name][:k])
        if layers not in measured:
            model.set_quantized(layers)
            nll, tokens = model.nll(windows)
            measured[layers] = perplexity(nll, tokens)
        curves[name][str(k)] = measured[layers]
    for name in ("front_to_back", "back_to_front"):
        for k in (0, L):
            curves[name][str(k)] = measured[frozenset(orders[name][:k])]
        curves[name] = dict(sorted(curves[name].items(), key=lambda kv: int(kv[0])))
    model.set_quantized(())
    fp = curves["lis"]["0"]
    return {
        "metric": "perplexity",
        "eval_text": str(Path(eval_text).resolve()),
        "window": window,
        "num_windows": len(windows.windows),
        "tokens": windows.scored_tokens,
        "fp16_ppl": fp,
        "all_quantized_ppl": curves["lis"][str(L)],
        "orders": {name: {"order": orders[name], "ppl": curves[name]} for name in orders},
        "relative_increase": {
            name: {k: v / fp - 1.0 for k, v in curves[name].items()} for name in orders
        },
    }
