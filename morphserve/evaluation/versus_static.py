"""Each row's MorphServe against the static system a user would pick instead: the row's
best static precision. A runtime that morphs is only worth running if it is at least as
good as the best fixed choice on the same row, so the suite's leading table is this one,
not the comparison with FP16.

The rules (written in suite-v4.yaml before it ran):
- best static: the static system with the fewest median violations, ties broken by the
  lower median P95 TTFT;
- violations: MorphServe's median <= the best static system's, or a tie (each median
  inside the other's [low, high] range over the repetitions);
- P95 TTFT: MorphServe's median <= 1.25x the best static system's;
- quality: MorphServe's perplexity increase <= static W8A8's;
- memory: MorphServe's median peak RSS <= plain FP16's;
- capacity-beyond rows also: violations <= half the best static system's, at a perplexity
  increase <= 1/3 of static W4A16's.
Two readings the rules leave open are made visible rather than counted as wins or losses:
- P95 TTFT infinite on both sides (more than 5% of requests failed or were cut, for both):
  the rule holds (inf <= 1.25 x inf) but says nothing, so the entry is marked `vacuous`
  and carries both median TTFTs for the reader;
- a suite with no static W8A8 system (a development run against plain vLLM only) leaves
  the quality rule nothing to compare: quality is "n/a" and the row's verdict is "not
  judged" (`all_met` None) unless another rule already failed;
- a capacity-beyond row on a CPU with no W4A16 kernel has no static W4A16 to measure a
  third of: that half of the extra rule is "n/a" and is not counted either way (the general
  quality rule, <= static W8A8's, still applies).
Plain Python over the report's cells.
"""

from __future__ import annotations

import math

from morphserve.evaluation.suite import SYSTEM_KINDS

STATIC_KINDS = tuple(kind for kind in SYSTEM_KINDS if kind != "morphserve")  # plain vLLM, one precision
TTFT_FACTOR = 1.25
BEYOND_FEWER_FRACTION = 0.5  # violations at most this share of the best static system's
BEYOND_QUALITY_OF_W4 = 1 / 3


def _median(row: dict, figure: str) -> float | None:
    return (row.get(figure) or {}).get("median")


def _inside(value: float | None, spread: dict) -> bool:
    low, high = spread.get("low"), spread.get("high")
    return value is not None and low is not None and high is not None and low <= value <= high


def best_static(systems: dict[str, dict], kinds: dict[str, str]) -> str | None:
    static = [name for name in systems if kinds.get(name) in STATIC_KINDS
              and _median(systems[name], "slo_violations") is not None]
    if not static:
        return None

    def key(name: str):
        ttft = _median(systems[name], "ttft_p95")
        return (_median(systems[name], "slo_violations"), float("inf") if ttft is None else ttft)

    return min(static, key=key)


def _first_of_kind(systems: dict[str, dict], kinds: dict[str, str], kind: str) -> dict | None:
    for name, row in systems.items():
        if kinds.get(name) == kind:
            return row
    return None


def violations_verdict(ours: dict, theirs: dict) -> str:
    """'yes' (median no higher), 'tie' (each median inside the other's range) or 'no'."""
    mine, best = ours.get("median"), theirs.get("median")
    if mine is None or best is None:
        return "n/a"
    if mine <= best:
        return "yes"
    return "tie" if _inside(mine, theirs) and _inside(best, ours) else "no"


def compare_cell(cell: dict) -> list[dict]:
    """One entry per MorphServe system in the cell (none when the cell has no static one)."""
    systems, kinds = cell["systems"], cell.get("kinds", {})
    best = best_static(systems, kinds)
    if best is None:
        return []
    theirs = systems[best]
    fp16 = _first_of_kind(systems, kinds, "fp16")
    w8a8 = _first_of_kind(systems, kinds, "w8a8")
    w4 = _first_of_kind(systems, kinds, "w4")
    out = []
    for name, ours in systems.items():
        if kinds.get(name) != "morphserve":
            continue
        v_ours, v_best = _median(ours, "slo_violations"), _median(theirs, "slo_violations")
        t_ours, t_best = _median(ours, "ttft_p95"), _median(theirs, "ttft_p95")
        q_ours = _median(ours, "ppl_increase")
        q_w8 = _median(w8a8, "ppl_increase") if w8a8 else None
        rss_ours = _median(ours, "peak_rss_total_mib")
        rss_fp16 = _median(fp16, "peak_rss_total_mib") if fp16 else None
        entry = {
            "window": cell["window"], "budget": cell["budget"], "regime": cell.get("regime"),
            "system": name, "best_static": best,
            "violations": {"morphserve": ours["slo_violations"], "best_static": theirs["slo_violations"],
                           "met": violations_verdict(ours["slo_violations"], theirs["slo_violations"])},
            "ttft_p95": {"morphserve": ours["ttft_p95"], "best_static": theirs["ttft_p95"],
                         "ratio": None if not t_best or t_ours is None or math.isinf(t_best) else t_ours / t_best,
                         "met": None if t_ours is None or t_best is None else t_ours <= TTFT_FACTOR * t_best},
            "quality": {"morphserve": q_ours, "w8a8": q_w8,
                        "met": "n/a" if w8a8 is None
                        else None if q_ours is None or q_w8 is None else q_ours <= q_w8},
            "memory": {"morphserve": rss_ours, "fp16": rss_fp16,
                       "met": None if rss_ours is None or rss_fp16 is None else rss_ours <= rss_fp16},
        }
        if t_ours is not None and t_best is not None and math.isinf(t_ours) and math.isinf(t_best):
            entry["ttft_p95"]["vacuous"] = True
            entry["ttft_p95"]["p50"] = {"morphserve": _median(ours, "ttft_p50"), "best_static": _median(theirs, "ttft_p50")}
        if cell.get("regime") == "capacity-beyond":
            q_w4 = _median(w4, "ppl_increase") if w4 else None
            entry["beyond"] = {
                "violations_met": None if v_ours is None or v_best is None
                else v_ours <= BEYOND_FEWER_FRACTION * v_best,
                "quality_met": "n/a" if w4 is None
                else None if q_ours is None or q_w4 is None else q_ours <= BEYOND_QUALITY_OF_W4 * q_w4,
                "w4": q_w4,
            }
        checks = [entry["violations"]["met"] in ("yes", "tie"), entry["ttft_p95"]["met"], entry["quality"]["met"],
                  entry["memory"]["met"]]
        if "beyond" in entry:
            checks.append(entry["beyond"]["violations_met"])
            if entry["beyond"]["quality_met"] != "n/a":  # no W4A16 kernel, no W4A16 system
                checks.append(entry["beyond"]["quality_met"])
        if entry["quality"]["met"] == "n/a":  # a development suite with no static W8A8: the row is not judged
            entry["all_met"] = False if False in checks else None
            entry["unjudged"] = "no static W8A8 system in the suite, so the quality rule has nothing to compare"
        else:
            entry["all_met"] = all(c is True for c in checks)
        out.append(entry)
    return out


def compare(report: dict) -> list[dict]:
    return [entry for cell in report["cells"] for entry in compare_cell(cell)]
