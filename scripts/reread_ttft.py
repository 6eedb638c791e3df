"""P95 TTFT of a saved evaluation, read again with each cut request's first token counted.

Until 2026-11-30 the evaluation counted every request that failed, a request cut at the
deadline after its first token included, as an infinite TTFT (morphserve.replay.stats), so a
system with one or two requests still running at the deadline read "P95 TTFT infinite" even
where every first token had arrived. Runs made since count that token's time. This reads the
saved requests of older runs the same way, without touching their run.json, and prints each
system's P95 TTFT per repetition and the median [range] over them, both ways.

    python scripts/reread_ttft.py RESULTS_DIR --window W --budget B

It reads each run's requests.jsonl, which stays on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from morphserve.replay.stats import percentile


def first_token_s(row: dict) -> float:
    """The request's TTFT: its own, or for a failed request the first streamed token's time."""
    if row.get("ttft_s") is not None:
        return row["ttft_s"]
    offsets = row.get("token_offsets_s") or []
    return offsets[0] if offsets else math.inf


def p95s(folder: Path) -> tuple[float, float]:
    """(P95 TTFT as the run counted it, P95 TTFT with first tokens counted)."""
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines() if line.strip()]
    as_run = [r["ttft_s"] if r["ok"] else math.inf for r in rows]
    return percentile(as_run, 95), percentile([first_token_s(r) for r in rows], 95)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a `morphserve evaluate --out` folder")
    ap.add_argument("--window", required=True, help="the window's name in the suite")
    ap.add_argument("--budget", required=True, help="the budget's name in the suite")
    args = ap.parse_args(argv)
    base = args.results / args.window / args.budget
    systems = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    found = False
    for name in systems:
        reps = sorted(p for p in (base / name).glob("rep*") if (p / "requests.jsonl").is_file())
        if not reps:
            continue
        found = True
        pairs = [p95s(rep) for rep in reps]
        print(f"{name}: P95 TTFT (s) as run {spread([a for a, _ in pairs])}, with first tokens "
              f"{spread([b for _, b in pairs])} ({', '.join(f'{b:.2f}' for _, b in pairs)})")
    if not found:
        print(f"error: no saved requests.jsonl under {base}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
