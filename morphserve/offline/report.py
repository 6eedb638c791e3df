"""Human-readable summary of a pack: the importance order and the quality curve."""

from __future__ import annotations

import json
from pathlib import Path

from morphserve.offline import pack as packfmt


def summarize_pack(pack_dir: Path) -> str:
    pack_dir = Path(pack_dir)
    m = packfmt.load_manifest(pack_dir)
    q = json.loads((pack_dir / packfmt.QUALITY).read_text())
    fp_total = sum(b.fp16 for b in m.layer_bytes)
    q_total = sum(b.quantized for b in m.layer_bytes)
    lines = [
        f"pack {pack_dir}: {m.architecture}, {m.num_layers} layers, W{m.bits}A16 g{m.group_size} ({m.quantization_source})",
        f"decoder linears: {fp_total / 1e6:.1f} MB bf16 -> {q_total / 1e6:.1f} MB W{m.bits} "
        f"(frees {(fp_total - q_total) / 1e6:.1f} MB with every layer quantized)",
        f"swap order (most swappable first): {' '.join(map(str, m.swap_order))}",
        f"perplexity on {q['tokens']} tokens of {Path(q['eval_text']).name}; FP16 {q['fp16_ppl']:.3f}",
        "",
        f"{'k':>3}  {'LIS':>10}  {'front->back':>12}  {'back->front':>12}",
    ]
    orders = q["orders"]
    for k in sorted(orders["lis"]["ppl"], key=int):
        cells = []
        for name in ("lis", "front_to_back", "back_to_front"):
            v = orders[name]["ppl"].get(k)
            cells.append(f"{v:.3f} ({v / q['fp16_ppl'] - 1:+.1%})" if v is not None else "")
        lines.append(f"{k:>3}  {cells[0]:>18}  {cells[1]:>18}  {cells[2]:>18}")
    for tier in m.tiers:
        t_total = sum(tier.layer_bytes)
        lad = q.get("ladder", {})
        lines += ["", f"tier {tier.name} ({tier.quantization_source}): {t_total / 1e6:.1f} MB "
                      f"(frees {(fp_total - t_total) / 1e6:.1f} MB with every layer in it)",
                  f"  swap order: {' '.join(map(str, tier.swap_order))}",
                  f"ladder: {2 * m.num_layers} levels, {tier.name} first, then W{m.bits}A16; perplexity per level:"]
        ppl = lad.get("ppl", {})
        for k in sorted(ppl, key=int):
            if int(k) % 5 == 0:
                lines.append(f"{k:>5}  {ppl[k]:.3f} ({ppl[k] / q['fp16_ppl'] - 1:+.1%})")
        check = lad.get("check")
        if check:
            lines.append(f"  all-{tier.name} frees {check['all_w8a8_bytes_freed'] / 1e6:.1f} MB at "
                         f"{check['all_w8a8_ppl']:.3f}; W{m.bits}A16 alone needs {check['w4a16_layers_freeing_as_much']} "
                         f"layers for as much, at {check['w4a16_ppl_there']:.3f}")
    if m.timings_s:
        lines.append("")
        lines.append("timings (s): " + ", ".join(f"{k} {v}" for k, v in m.timings_s.items()))
    return "\n".join(lines)
