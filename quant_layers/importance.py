"""Layer Importance Score (LIS) ranking, the paper's greedy procedure, as pure logic.

LIS_p = 0.25 * LTS_p + 0.25 * LRS_p + 0.5 * MDS_p, where a *higher* score means the layer
is *safer* to quantize (it transforms its input little, its W4 twin reproduces it well,
and quantizing it moves the final output little). Each round picks the highest-LIS layer,
adds it to the quantized set Q, and recomputes MDS against the new Q; LTS and LRS do not
depend on Q and are measured once.

The model-facing measurements are injected as callables so the ranking itself is plain
Python, testable in milliseconds (see tests/test_importance.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

W_LTS, W_LRS, W_MDS = 0.25, 0.25, 0.5


def lis(lts: float, lrs: float, mds: float) -> float:
    return W_LTS * lts + W_LRS * lrs + W_MDS * mds


@dataclass
class Round:
    """One greedy round: the scores of every candidate and the layer it chose."""

    round: int
    quantized_before: list[int]
    scores: dict[int, dict[str, float]]
    chosen: int


@dataclass
class LisResult:
    order: list[int]
    lts: dict[int, float]
    lrs: dict[int, float]
    rounds: list[Round] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "weights": {"lts": W_LTS, "lrs": W_LRS, "mds": W_MDS},
            "order": self.order,
            "lts": {str(k): v for k, v in self.lts.items()},
            "lrs": {str(k): v for k, v in self.lrs.items()},
            "rounds": [
                {**asdict(r), "scores": {str(k): v for k, v in r.scores.items()}} for r in self.rounds
            ],
        }


MdsFn = Callable[[frozenset[int], Sequence[int]], dict[int, float]]


def greedy_lis_order(
    layers: Sequence[int],
    lts: dict[int, float],
    lrs: dict[int, float],
    mds_for_round: MdsFn,
    on_round: Callable[[Round], None] | None = None,
) -> LisResult:
    """Rank `layers` from most to least swappable.

    `mds_for_round(Q, candidates)` returns MDS_p = cos(f^Q(x), f^{Q+p}(x)) for every
    candidate p. Ties are broken towards the lower layer id so the order is deterministic.
    """
    remaining = list(layers)
    missing = [p for p in remaining if p not in lts or p not in lrs]
    if missing:
        raise ValueError(f"LTS/LRS missing for layers {missing}")
    result = LisResult(order=[], lts=dict(lts), lrs=dict(lrs))
    quantized: list[int] = []
    while remaining:
        mds = mds_for_round(frozenset(quantized), remaining)
        scores = {
            p: {"lts": lts[p], "lrs": lrs[p], "mds": mds[p], "lis": lis(lts[p], lrs[p], mds[p])}
            for p in remaining
        }
        chosen = max(remaining, key=lambda p: (scores[p]["lis"], -p))
        rnd = Round(round=len(quantized), quantized_before=list(quantized), scores=scores, chosen=chosen)
        result.rounds.append(rnd)
        if on_round:
            on_round(rnd)
        quantized.append(chosen)
        remaining.remove(chosen)
    result.order = quantized
    return result
