"""Apply suite-v4's window-selection rule to a baselines-only calibration run.

The rule was written in the calibration suite file before any of it ran
(evaluations/calibration/suite-v4-windows.yaml; code: morphserve/evaluation/window_rule.py).
This reads the calibration's report.json (`morphserve evaluate` writes it), prints every
candidate's violation shares and regimes at each suite budget, then the window each regime
gets (or "missing"), and writes the same as JSON. It runs nothing itself. Cells whose runs
have not all finished are left out, so a partial calibration gives a partial answer.

    python scripts/select_windows.py --suite evaluations/calibration/suite-v4-windows.yaml \\
        --calibration evaluations/results/suite-v4-calibration-epyc [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.errors import MorphServeError  # noqa: E402
from morphserve.evaluation.suite import load_suite  # noqa: E402
from morphserve.evaluation.window_rule import REGIMES, classify, select, shares_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--suite", required=True, type=Path, help="the calibration suite file (its windows, in order)")
    ap.add_argument("--calibration", required=True, type=Path, help="the calibration's output folder (report.json)")
    ap.add_argument("--roomy-budget", default="bf16-plus-1GiB",
                    help="the budget at which FP16 has KV to spare (tells capacity from compute)")
    ap.add_argument("--json", type=Path, default=None, help="write the shares and the selection here")
    args = ap.parse_args()
    try:
        suite = load_suite(args.suite)
        report = json.loads((args.calibration / "report.json").read_text())
    except (MorphServeError, OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    budgets = [b.name for b in suite.budgets if b.name != args.roomy_budget]
    windows = [w.name for w in suite.windows]
    shares = shares_of(report, budgets, args.roomy_budget)
    print(f"{report.get('suite')} on {report.get('machine', {}).get('cpu', '?')}: {len(shares)} of "
          f"{len(windows) * len(budgets)} (window, budget) cells complete")
    print("| window | budget | FP16 | static W8A8 | FP16 at bf16 + 1 GiB | regimes |")
    print("|---|---|---|---|---|---|")
    for w in windows:
        for b in budgets:
            s = shares.get((w, b))
            if s is not None:
                print(f"| {w} | {b} | {s.fp16:.0%} | {s.w8a8:.0%} | {s.fp16_roomy:.0%} | "
                      f"{', '.join(classify(s)) or '-'} |")
    chosen = select(shares, windows, budgets)
    for regime in REGIMES:
        c = chosen[regime]
        print(f"{regime}: " + (f"{c['window']} at {c['budget']}" if c else "missing"))
    if args.json:
        args.json.write_text(json.dumps({"suite": report.get("suite"), "machine": report.get("machine"),
                                         "shares": {f"{w}/{b}": vars(s) for (w, b), s in shares.items()},
                                         "selection": chosen}, indent=1) + "\n")


if __name__ == "__main__":
    main()
