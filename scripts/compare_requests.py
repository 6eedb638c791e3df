"""Request by request, how one system of an evaluation served the same requests as another.

An evaluation replays the same requests against every system, so a request completed by
both can be compared directly: this prints the median [min, max] of system B's TPOT and TTFT
over system A's, over every repetition of one window and budget, and then each repetition's
own median with their range (the spread a run-to-run difference must clear to count). It separates "slower per
token" from "fewer requests completed", which the report's percentiles mix.

    python scripts/compare_requests.py RESULTS_DIR --window W --budget B --a fp16 --b morphserve [--reps 1,3]

It reads each run's requests.jsonl, which stays on the machine that ran it (the results
folders keep only the files a report needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def requests(folder: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines() if line.strip()]
    return {r["index"]: r for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a `morphserve evaluate --out` folder")
    ap.add_argument("--window", required=True, help="the window's name in the suite")
    ap.add_argument("--budget", required=True, help="the budget's name in the suite")
    ap.add_argument("--a", required=True, help="the reference system")
    ap.add_argument("--b", required=True, help="the system compared with it")
    ap.add_argument("--reps", help="only these repetitions, comma-separated numbers (default: every one)")
    args = ap.parse_args(argv)
    wanted = {f"rep{n.strip()}" for n in args.reps.split(",")} if args.reps else None
    base = args.results / args.window / args.budget
    reps = sorted(p.name for p in (base / args.a).glob("rep*") if (base / args.b / p.name / "requests.jsonl").is_file()
                  and (p / "requests.jsonl").is_file() and (wanted is None or p.name in wanted)) \
        if (base / args.a).is_dir() else []
    if not reps:
        print(f"error: no repetition of both {args.a!r} and {args.b!r} under {base}", file=sys.stderr)
        return 2
    ratios: dict[str, list[float]] = {"tpot": [], "ttft": []}
    per_rep: dict[str, list[float]] = {"tpot": [], "ttft": []}
    for rep in reps:
        a, b = requests(base / args.a / rep), requests(base / args.b / rep)
        this: dict[str, list[float]] = {"tpot": [], "ttft": []}
        for i, ra in a.items():
            rb = b.get(i)
            if rb is None or not (ra["ok"] and rb["ok"]):
                continue
            for key in this:
                if ra.get(f"{key}_s") and rb.get(f"{key}_s"):
                    this[key].append(rb[f"{key}_s"] / ra[f"{key}_s"])
        for key, values in this.items():
            ratios[key] += values
            if values:
                per_rep[key].append(statistics.median(values))
    print(f"{args.b} over {args.a}, {args.window} at {args.budget}, repetitions {', '.join(reps)}:")
    for key, values in ratios.items():
        if values:
            medians = per_rep[key]
            print(f"  {key.upper()}: median {statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}] "
                  f"over {len(values)} requests completed by both; per repetition "
                  f"{', '.join(f'{m:.3f}x' for m in medians)} (median {statistics.median(medians):.3f}x "
                  f"[{min(medians):.3f}, {max(medians):.3f}])")
        else:
            print(f"  {key.upper()}: no request completed by both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
