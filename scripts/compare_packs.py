"""Does a cheaper `prepare` serve a worse ladder? Compare two packs of the same model.

Two packs made with different `prepare` settings (say GPTQ against round-to-nearest W8A8
weights, or the W8A8 tier's own greedy order against the W4A16 tier's) each measured their
ladder's perplexity at every level with the same instrument. When both used the same
evaluation text, windows and tokens, those curves are directly comparable: this prints
each level's relative perplexity increase in both packs, their difference in percentage
points, the largest and mean difference, and each pack's `prepare` timings. It measures
nothing itself; it refuses packs whose curves were measured on different tokens.

    python scripts/compare_packs.py PACK_A PACK_B [--every 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.errors import MorphServeError  # noqa: E402
from morphserve.offline import pack as packfmt  # noqa: E402
from morphserve.offline.ladder import level_ppl_curve  # noqa: E402
from policies.config import PolicyError  # noqa: E402

SAME_INSTRUMENT = ("eval_text", "window", "num_windows", "tokens", "compute_dtype")


def load(pack: Path) -> tuple[packfmt.Manifest, dict]:
    manifest = packfmt.load_manifest(pack)
    try:
        quality = json.loads((pack / packfmt.QUALITY).read_text())
    except (OSError, ValueError) as e:
        raise MorphServeError(f"{pack}: cannot read {packfmt.QUALITY}: {e}") from None
    return manifest, quality


def compare(a: dict, b: dict) -> dict:
    """Per-level relative increases of two quality.json files, and their differences (b - a)."""
    differ = [k for k in SAME_INSTRUMENT if a.get(k) != b.get(k)]
    if differ:
        raise MorphServeError("the packs' curves were measured differently (" + ", ".join(
            f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differ) + "); nothing to compare")
    ca, cb = level_ppl_curve(a), level_ppl_curve(b)
    if sorted(ca) != sorted(cb):
        raise MorphServeError(f"the ladders differ in length: {len(ca)} and {len(cb)} levels")
    rows = []
    for level in sorted(ca):
        ra, rb = ca[level] / ca[0] - 1.0, cb[level] / cb[0] - 1.0
        rows.append({"level": level, "a": ra, "b": rb, "b_minus_a_pp": 100 * (rb - ra)})
    diffs = [r["b_minus_a_pp"] for r in rows[1:]]
    return {"levels": rows, "max_abs_pp": max(map(abs, diffs)), "mean_pp": statistics.fmean(diffs),
            "b_worse_at": sum(d > 0 for d in diffs), "b_better_at": sum(d < 0 for d in diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("pack_a", type=Path, help="the reference pack (say, made with the thorough settings)")
    ap.add_argument("pack_b", type=Path, help="the pack to judge against it")
    ap.add_argument("--every", type=int, default=5, help="print every Nth level (the summary covers all)")
    ap.add_argument("--json", type=Path, default=None, help="write the whole comparison here")
    args = ap.parse_args()
    try:
        (ma, qa), (mb, qb) = load(args.pack_a), load(args.pack_b)
        result = compare(qa, qb)
    except (MorphServeError, PolicyError) as e:
        sys.exit(f"error: {e}")
    print(f"A {args.pack_a}: prepare {ma.timings_s}")
    print(f"B {args.pack_b}: prepare {mb.timings_s}")
    print(f"{'level':>5}  {'A increase':>10}  {'B increase':>10}  {'B - A (pp)':>10}")
    for r in result["levels"]:
        if r["level"] % args.every == 0 or r["level"] == result["levels"][-1]["level"]:
            print(f"{r['level']:>5}  {r['a']:>+10.2%}  {r['b']:>+10.2%}  {r['b_minus_a_pp']:>+10.2f}")
    print(f"over {len(result['levels']) - 1} levels: largest |B - A| {result['max_abs_pp']:.2f} pp, "
          f"mean B - A {result['mean_pp']:+.2f} pp; B worse at {result['b_worse_at']}, better at {result['b_better_at']}")
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.pack_a), "b": str(args.pack_b),
                                         "timings_a": ma.timings_s, "timings_b": mb.timings_s, **result}, indent=1))


if __name__ == "__main__":
    main()
