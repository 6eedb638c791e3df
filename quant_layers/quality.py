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


def quality_curves(model, windows: Windows, lis_order: list[int], eval_text: Path, window: int,
                   lis_points: list[int] | None = None) -> dict:
    """`lis_points`: the layer counts at which the LIS curve is measured (every k when None;
    0, the baselines' checkpoints and L are always measured)."""
    L = len(lis_order)
    orders = {
        "lis": list(lis_order),
        "front_to_back": list(range(L)),
        "back_to_front": list(range(L - 1, -1, -1)),
    }
    ks = range(L + 1) if lis_points is None else sorted({0, L, *checkpoints(L), *lis_points})
    plan = [("lis", k) for k in ks]
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


def w4_layers_freeing_as_much(ladder) -> int:
    """How many layers the W4A16-only order needs to free the bytes all-W8A8 frees (the
    ladder's check: W8A8 first should be the cheaper way to free them)."""
    L = len(ladder.rungs) // 2
    w8_freed = sum(ladder.savings[:L])
    w8_saving = {r.layer: r.saving for r in ladder.rungs[:L]}
    freed, k = 0, 0
    for r in ladder.rungs[L:]:  # the W4A16 order; bf16 -> W4A16 frees both rungs' bytes
        if freed >= w8_freed:
            break
        freed += w8_saving[r.layer] + r.saving
        k += 1
    return k


def tier_curves(model, windows: Windows, ladder, w8_order: list[int], w4_curve: dict[str, float]) -> dict:
    """Perplexity at every level of the tiered ladder (`ladder`: morphserve.offline.ladder),
    the W8A8 tier's own curve (the ladder's first half), and the check that the ladder is
    the cheaper way to free memory: at the bytes all-W8A8 frees, the W4A16-only order
    (`w4_curve`, its perplexity per layer count) needs k layers and reaches a perplexity
    the ladder should not exceed."""
    L = len(w8_order)
    # bf16 and every layer in W4A16 are points of the W4A16 curve already measured
    ppl: dict[str, float] = {"0": w4_curve["0"]}
    top = {layer: ("base" if tier == "w4a16" else tier) for layer, tier in ladder.config(ladder.top).items()}
    if len(top) == L and set(top.values()) == {"base"}:
        ppl[str(ladder.top)] = w4_curve[str(L)]
    for level in tqdm([k for k in range(ladder.top + 1) if str(k) not in ppl], desc="perplexity (ladder)",
                      file=sys.stderr):
        config = {layer: ("base" if tier == "w4a16" else tier) for layer, tier in ladder.config(level).items()}
        model.set_config(config)
        nll, tokens = model.nll(windows)
        ppl[str(level)] = perplexity(nll, tokens)
    ppl = dict(sorted(ppl.items(), key=lambda kv: int(kv[0])))
    model.set_quantized(())
    fp = ppl["0"]
    w8_freed = sum(ladder.savings[:L])
    k = w4_layers_freeing_as_much(ladder)
    w4_ppl = w4_curve[str(k)]
    return {
        "tiers": {"w8a8": {"order": list(w8_order), "ppl": {str(j): ppl[str(j)] for j in range(L + 1)},
                           "relative_increase": {str(j): ppl[str(j)] / fp - 1.0 for j in range(L + 1)}}},
        "ladder": {
            "rungs": [[r.layer, r.tier] for r in ladder.rungs],
            "ppl": ppl,
            "relative_increase": {j: v / fp - 1.0 for j, v in ppl.items()},
            "check": {"all_w8a8_bytes_freed": w8_freed, "all_w8a8_ppl": ppl[str(L)],
                      "w4a16_layers_freeing_as_much": k, "w4a16_ppl_there": w4_ppl,
                      "ladder_cheaper": ppl[str(L)] <= w4_ppl},
        },
    }
