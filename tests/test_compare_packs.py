"""scripts/compare_packs.py: the comparison of two packs' ladders, as pure logic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from morphserve.errors import MorphServeError

spec = importlib.util.spec_from_file_location("compare_packs", Path(__file__).parent.parent / "scripts/compare_packs.py")
compare_packs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_packs)

INSTRUMENT = {"eval_text": "/t.txt", "window": 1024, "num_windows": 8, "tokens": 8184, "compute_dtype": "float32"}


def quality(ppl: list[float], **over) -> dict:
    return {**INSTRUMENT, **over, "ladder": {"ppl": {str(k): v for k, v in enumerate(ppl)}}}


def test_differences_are_per_level_relative_increases_in_points():
    result = compare_packs.compare(quality([20.0, 21.0, 22.0]), quality([10.0, 10.4, 11.2]))
    assert [round(r["b_minus_a_pp"], 6) for r in result["levels"]] == [0.0, -1.0, 2.0]
    assert result["max_abs_pp"] == pytest.approx(2.0) and result["mean_pp"] == pytest.approx(0.5)
    assert (result["b_worse_at"], result["b_better_at"]) == (1, 1)


def test_curves_measured_on_other_tokens_or_ladders_of_other_lengths_are_refused():
    with pytest.raises(MorphServeError, match="tokens: 8184 vs 255"):
        compare_packs.compare(quality([20.0, 21.0]), quality([20.0, 21.0], tokens=255))
    with pytest.raises(MorphServeError, match="3 and 2 levels"):
        compare_packs.compare(quality([20.0, 21.0, 22.0]), quality([20.0, 21.0]))
