"""suite-v4's window selection: the rule written in
evaluations/calibration/suite-v4-windows.yaml before any of it ran, applied to a
baselines-only calibration run (plain vLLM FP16 at each suite budget and at bf16 + 1 GiB,
static W8A8 at each suite budget). Plain Python over `morphserve evaluate`'s report.json,
so the selection is a function of committed numbers, not of a reading by hand.

A request violates if it fails or breaks the TTFT or TPOT SLO; a system's share is its
median violations over the window's requests. At one budget:
- light: FP16 and static W8A8 both <= 5%;
- capacity: FP16 >= 20%, FP16 at bf16 + 1 GiB <= 5% (more KV fixes it), static W8A8 <= 5%;
- capacity-beyond: FP16 and static W8A8 >= 20%, FP16 at bf16 + 1 GiB <= 5% (still a KV
  shortage, beyond what 8 bits free);
- compute: FP16 >= 20% at the budget and at bf16 + 1 GiB (more KV does not help).
Per regime the suite takes the first candidate, in the file's order of windows and then
budgets, that classifies; a regime with none is reported missing, never filled by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

LIGHT_MAX = 0.05
SHORT_MIN = 0.20
REGIMES = ("light", "capacity", "capacity-beyond", "compute")


@dataclass(frozen=True)
class Shares:
    """Violation shares of one window at one suite budget."""
    fp16: float
    w8a8: float
    fp16_roomy: float  # FP16 at bf16 + 1 GiB


def classify(s: Shares) -> list[str]:
    out = []
    if s.fp16 <= LIGHT_MAX and s.w8a8 <= LIGHT_MAX:
        out.append("light")
    if s.fp16 >= SHORT_MIN and s.fp16_roomy <= LIGHT_MAX and s.w8a8 <= LIGHT_MAX:
        out.append("capacity")
    if s.fp16 >= SHORT_MIN and s.w8a8 >= SHORT_MIN and s.fp16_roomy <= LIGHT_MAX:
        out.append("capacity-beyond")
    if s.fp16 >= SHORT_MIN and s.fp16_roomy >= SHORT_MIN:
        out.append("compute")
    return out


def _share(cell: dict, system: str) -> float | None:
    entry = cell["systems"].get(system)
    if entry is None or not cell.get("requests"):
        return None
    return entry["slo_violations"]["median"] / cell["requests"]


def shares_of(report: dict, budgets: list[str], roomy: str) -> dict[tuple[str, str], Shares]:
    """(window, budget) -> Shares, for every window the report has at every one of
    `budgets` and at `roomy` (cells still missing a run are left out)."""
    cells = {(c["window"], c["budget"]): c for c in report["cells"]}
    out = {}
    for (window, budget), cell in cells.items():
        if budget not in budgets or (window, roomy) not in cells:
            continue
        fp16, w8, fp16_roomy = _share(cell, "fp16"), _share(cell, "w8a8"), _share(cells[(window, roomy)], "fp16")
        if None not in (fp16, w8, fp16_roomy):
            out[(window, budget)] = Shares(fp16, w8, fp16_roomy)
    return out


def select(shares: dict[tuple[str, str], Shares], windows: list[str], budgets: list[str]) -> dict[str, dict | None]:
    """Per regime, the first (window, budget) in file order that classifies, or None."""
    chosen: dict[str, dict | None] = {r: None for r in REGIMES}
    for window in windows:
        for budget in budgets:
            s = shares.get((window, budget))
            if s is None:
                continue
            for regime in classify(s):
                if chosen[regime] is None:
                    chosen[regime] = {"window": window, "budget": budget, "fp16": s.fp16, "w8a8": s.w8a8,
                                      "fp16_roomy": s.fp16_roomy}
    return chosen
