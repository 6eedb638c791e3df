"""Forward time per step size, system against system, from vLLM's own log of it.

vLLM times every model forward by its number of tokens when `VLLM_LOG_BATCHSIZE_INTERVAL` is set
(`vllm/forward_context.py`) and logs, cumulatively, "Batchsize forward time stats (batchsize,
count, median_time(ms))". `morphserve evaluate` run with that variable and a logging config that lets the
one logger through (evaluations/calibration/vllm-forward-times-logging.json) leaves those lines in each
run's server.log, for plain vLLM and MorphServe alike. This reads the last line of each run and
compares two systems repetition by repetition:

- the ratio of B's median forward time to A's at each step size both served at least `--min-count`
  times, summarised as the median ratio weighted by B's count, overall and by band of step size;
- each run's logged forwards and their summed time (count x median), beside the worker's CPU seconds
  and vLLM's steps from run.json. vLLM's line leaves out every step size it saw only once (most
  prompt steps) and the forwards after its last line, so these totals are a part of the run, not all
  of it: they say how much of the run the ratios stand on.

The parsing is here because vLLM offers these figures only as a log line.

    python scripts/forward_times.py RESULTS_DIR --window W --budget B --a w8a8-thp --b morphserve-thp [--b ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

import numpy as np

MARK = "Batchsize forward time stats (batchsize, count, median_time(ms)):"
BANDS = ((1, 16), (17, 128), (129, 1 << 30))


def last_stats(log: Path) -> dict[int, tuple[int, float]]:
    """{step size: (forwards, median ms)} from the last stats line of a server log."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        at = line.find(MARK)
        if at >= 0:
            found = line[at + len(MARK):].strip()
    if found is None:
        raise ValueError(f"{log}: no '{MARK}' line (was VLLM_LOG_BATCHSIZE_INTERVAL set, and its logger let through?)")
    return {int(size): (int(count), float(ms)) for size, count, ms in ast.literal_eval(found)}


def weighted_median(pairs: list[tuple[float, int]]) -> float | None:
    """The median of values each repeated by its weight (the lower one at an even split)."""
    if not sum(w for _, w in pairs):
        return None
    values, weights = zip(*pairs)
    return float(np.quantile(values, 0.5, weights=weights, method="inverted_cdf"))


def ratios(a: dict, b: dict, min_count: int, band=(1, 1 << 30)) -> float | None:
    lo, hi = band
    common = [s for s in a if s in b and lo <= s <= hi and a[s][0] >= min_count and b[s][0] >= min_count]
    return weighted_median([(b[s][1] / a[s][1], b[s][0]) for s in common if a[s][1] > 0])


def totals(stats: dict, run: dict) -> dict:
    worker = run.get("process_work", {}).get("VLLM::Worker", {})
    return {"forwards": sum(c for c, _ in stats.values()), "forward_s": sum(c * ms for c, ms in stats.values()) / 1000,
            "worker_cpu_s": worker.get("cpu_s"), "steps": run.get("vllm_counters", {}).get("steps")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a `morphserve evaluate --out` folder")
    ap.add_argument("--window", required=True, help="the window's name")
    ap.add_argument("--budget", required=True, help="the budget's name, e.g. 329MB")
    ap.add_argument("--a", required=True, help="the reference system (ratios are B over A)")
    ap.add_argument("--b", action="append", required=True, help="a system compared with A (repeatable)")
    ap.add_argument("--min-count", type=int, default=5, help="step sizes served fewer times in either run are left out")
    args = ap.parse_args(argv)
    cell = args.results / args.window / args.budget
    systems = [args.a, *args.b]
    reps = {s: sorted(p for p in (cell / s).glob("rep*") if (p / "server.log").exists()) for s in systems}
    if not reps[args.a]:
        ap.error(f"no runs of {args.a} under {cell}")
    try:
        stats = {s: [last_stats(p / "server.log") for p in reps[s]] for s in systems}
    except (OSError, ValueError, SyntaxError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {s: [json.loads((p / "run.json").read_text()) if (p / "run.json").exists() else {} for p in reps[s]]
            for s in systems}
    print("| system | rep | forwards logged | vLLM's steps | logged forward s | worker CPU s | logged / CPU |")
    print("|---|---|---|---|---|---|---|")
    for s in systems:
        for k, (st, run) in enumerate(zip(stats[s], runs[s]), 1):
            t = totals(st, run)
            cpu = t["worker_cpu_s"]
            cells = [s, str(k), str(t["forwards"]), str(t["steps"] or "-"), f"{t['forward_s']:.1f}",
                     "-" if cpu is None else f"{cpu:.1f}", f"{t['forward_s'] / cpu:.3f}" if cpu else "-"]
            print("| " + " | ".join(cells) + " |")
    print("\nB's median forward time over A's at the same step size (weighted by B's forwards), repetition k "
          "against repetition k:\n")
    names = ["all sizes", *(f"{lo}-{hi}" if hi < 1 << 30 else f"over {lo - 1}" for lo, hi in BANDS)]
    print("| system | rep | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for s in args.b:
        per_band = {n: [] for n in names}
        for k, (a, b) in enumerate(zip(stats[args.a], stats[s]), 1):
            cells = []
            for name, band in zip(names, [(1, 1 << 30), *BANDS]):
                r = ratios(a, b, args.min_count, band)
                cells.append("-" if r is None else f"{r:.3f}")
                if r is not None:
                    per_band[name].append(r)
            print(f"| {s} | {k} | " + " | ".join(cells) + " |")
        print(f"| {s} | median | " + " | ".join(f"{statistics.median(v):.3f}" if v else "-" for v in per_band.values())
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
