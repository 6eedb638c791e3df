"""Decode step times of served replays, at the same batch: how long one token took to follow
the last, grouped by how many requests were decoding at that moment, counting only the gaps
when no prompt was being prefilled beside them.

A per-request TPOT mixes the step's speed with how many requests shared the step, and a
slower system ends up with more requests in flight, so its TPOT ratio overstates or hides the
per-step cost. vLLM's client records every token's arrival (`requests.jsonl`,
`token_offsets_s`); a gap between two tokens of a request, while k requests are between their
first and last token and none is waiting for its first, is one decode step at batch k (or a
few, if the scheduler skipped the request). The median gap per k compares two systems at the
same work per step, without a profiler in the server.

    python scripts/decode_gaps.py RESULTS_DIR --window W --budget B --a w8a8-compiled --b held30 [--b bare30 ...]
    python scripts/decode_gaps.py RESULTS_DIR --window W --budget B --a w8a8-compiled --b morph --by-level morph

Prints, per batch size, each system's median gap in ms and its count over every repetition,
then each system over `--a` (the median over batch sizes where both have `--min-gaps` gaps).
With `--by-level S`, also S's gaps split by the level MorphServe served at each gap's middle
(from each run's `transitions.jsonl`, whose moves carry the server's monotonic clock, the
clock the client stamps its requests with on the same machine): a per-step cost that only
some levels pay shows there.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from pathlib import Path


def spans(rows: list[dict]) -> list[tuple[float, float, float, list[float]]]:
    """Per request with tokens: (sent, first token, last token, token times), one clock."""
    out = []
    for r in rows:
        offsets = r.get("token_offsets_s") or []
        if offsets:
            times = [r["start_mono"] + o for o in offsets]
            out.append((r["start_mono"], times[0], times[-1], times))
    return out


def decode_gaps(rows: list[dict], max_batch: int = 64):
    """(batch, the gap's middle, gap seconds) for every gap with no prompt in flight; the batch
    is the requests decoding at the middle (capped at `max_batch`)."""
    req = spans(rows)
    for i, (_, _, _, times) in enumerate(req):
        for a, b in zip(times, times[1:]):
            if any(sent <= b and first >= a for j, (sent, first, _, _) in enumerate(req) if j != i):
                continue  # another request's prompt overlapped this gap
            mid = (a + b) / 2
            batch = sum(1 for (_, first, last, _) in req if first <= mid <= last)
            yield min(batch, max_batch), mid, b - a


def gaps_by_batch(rows: list[dict], max_batch: int = 64) -> dict[int, list[float]]:
    """Decode gaps (s) with no prompt in flight, keyed by the requests decoding at the gap's
    midpoint (capped at `max_batch`)."""
    out: dict[int, list[float]] = {}
    for batch, _, gap in decode_gaps(rows, max_batch):
        out.setdefault(batch, []).append(gap)
    return out


def level_changes(transitions: list[dict]) -> tuple[int, list[float], list[int]]:
    """(the level before the first move, the monotonic times of every level reached, those
    levels), from a run's transitions (each move lists the levels it passed through)."""
    points = sorted((mono, level) for t in transitions for mono, _wall, level in t.get("levels") or [])
    first = transitions[0]["from"] if transitions else 0
    return first, [m for m, _ in points], [lv for _, lv in points]


def gaps_by_batch_and_level(rows: list[dict], transitions: list[dict],
                            max_batch: int = 64) -> dict[tuple[int, int], list[float]]:
    """Decode gaps keyed by (batch, the level served at the gap's middle)."""
    first, times, levels = level_changes(transitions)
    out: dict[tuple[int, int], list[float]] = {}
    for batch, mid, gap in decode_gaps(rows, max_batch):
        i = bisect.bisect_right(times, mid)
        out.setdefault((batch, levels[i - 1] if i else first), []).append(gap)
    return out


def ratio(a: dict[int, list[float]], b: dict[int, list[float]], min_gaps: int) -> tuple[float, list[int]] | None:
    """The median over batch sizes of b's median gap over a's, where both have `min_gaps`."""
    common = sorted(k for k in a if k in b and len(a[k]) >= min_gaps and len(b[k]) >= min_gaps)
    if not common:
        return None
    return statistics.median(statistics.median(b[k]) / statistics.median(a[k]) for k in common), common


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load(folder: Path) -> dict[int, list[float]]:
    merged: dict[int, list[float]] = {}
    for rep in sorted(folder.glob("rep*")):
        path = rep / "requests.jsonl"
        if path.is_file():
            for k, v in gaps_by_batch(read_jsonl(path)).items():
                merged.setdefault(k, []).extend(v)
    return merged


def load_by_level(folder: Path) -> dict[tuple[int, int], list[float]]:
    merged: dict[tuple[int, int], list[float]] = {}
    for rep in sorted(folder.glob("rep*")):
        requests, moves = rep / "requests.jsonl", rep / "transitions.jsonl"
        if requests.is_file() and moves.is_file():
            for k, v in gaps_by_batch_and_level(read_jsonl(requests), read_jsonl(moves)).items():
                merged.setdefault(k, []).extend(v)
    return merged


def print_by_level(system: str, data: dict[tuple[int, int], list[float]]) -> None:
    levels = sorted({lv for _, lv in data})
    print(f"\n{system}, by the level served:")
    print("| batch | " + " | ".join(f"level {lv} ms (gaps)" for lv in levels) + " |")
    print("|---" * (len(levels) + 1) + "|")
    for k in sorted({b for b, _ in data}):
        cells = [f"{statistics.median(data[(k, lv)]) * 1000:.1f} ({len(data[(k, lv)])})" if (k, lv) in data else "-"
                 for lv in levels]
        print(f"| {k} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a `morphserve evaluate --out` folder")
    ap.add_argument("--window", required=True, help="the window's name in the suite")
    ap.add_argument("--budget", required=True, help="the budget's name in the suite")
    ap.add_argument("--a", required=True, help="the reference system")
    ap.add_argument("--b", required=True, action="append", help="a system compared with it (repeatable)")
    ap.add_argument("--min-gaps", type=int, default=50, help="gaps a batch size needs in both systems to count")
    ap.add_argument("--by-level", metavar="SYSTEM", action="append", default=[],
                    help="also this MorphServe system's gaps by the level it served (needs its transitions.jsonl; "
                         "repeatable)")
    args = ap.parse_args(argv)
    base = args.results / args.window / args.budget
    systems = [args.a, *args.b]
    data = {s: load(base / s) for s in systems}
    missing = [s for s in systems if not data[s]]
    if missing:
        print(f"error: no requests.jsonl with tokens under {base} for {', '.join(missing)}", file=sys.stderr)
        return 2
    print("| batch | " + " | ".join(f"{s} ms (gaps)" for s in systems) + " |")
    print("|---" * (len(systems) + 1) + "|")
    for k in sorted(set().union(*data.values())):
        cells = [f"{statistics.median(data[s][k]) * 1000:.1f} ({len(data[s][k])})" if k in data[s] else "-"
                 for s in systems]
        print(f"| {k} | " + " | ".join(cells) + " |")
    for s in args.b:
        r = ratio(data[args.a], data[s], args.min_gaps)
        print(f"{s} / {args.a}: " + (f"{r[0]:.3f}x (median over batch sizes {r[1]})" if r else
                                     f"no batch size with {args.min_gaps} gaps in both"))
    for s in args.by_level:
        by_level = load_by_level(base / s)
        if not by_level:
            print(f"error: no requests.jsonl with transitions.jsonl under {base / s}", file=sys.stderr)
            return 2
        print_by_level(s, by_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
