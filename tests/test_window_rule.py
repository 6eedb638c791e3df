"""suite-v4's window-selection rule on synthetic calibration numbers (pure logic)."""

from __future__ import annotations

from morphserve.evaluation.window_rule import Shares, classify, select, shares_of


def test_each_regime_by_its_written_thresholds():
    assert classify(Shares(fp16=0.05, w8a8=0.0, fp16_roomy=0.0)) == ["light"]
    assert classify(Shares(fp16=0.20, w8a8=0.05, fp16_roomy=0.05)) == ["capacity"]
    assert classify(Shares(fp16=0.9, w8a8=0.3, fp16_roomy=0.0)) == ["capacity-beyond"]
    assert classify(Shares(fp16=0.9, w8a8=0.3, fp16_roomy=0.5)) == ["compute"]
    assert classify(Shares(fp16=0.10, w8a8=0.0, fp16_roomy=0.0)) == []  # between the thresholds
    assert classify(Shares(fp16=0.5, w8a8=0.1, fp16_roomy=0.1)) == []


def _cell(window, budget, requests, **violations):
    return {"window": window, "budget": budget, "requests": requests,
            "systems": {s: {"slo_violations": {"median": v}} for s, v in violations.items()}}


def test_the_first_candidate_in_file_order_is_taken_and_a_missing_regime_stays_missing():
    report = {"cells": [
        _cell("a", "329MB", 100, fp16=30, w8a8=0), _cell("a", "450MB", 100, fp16=0, w8a8=0),
        _cell("a", "roomy", 100, fp16=2),
        _cell("b", "329MB", 100, fp16=40, w8a8=1), _cell("b", "roomy", 100, fp16=0),
        _cell("c", "329MB", 50, fp16=50, w8a8=40),  # no roomy run yet: not classified
    ]}
    shares = shares_of(report, ["329MB", "450MB"], "roomy")
    assert set(shares) == {("a", "329MB"), ("a", "450MB"), ("b", "329MB")}
    chosen = select(shares, ["a", "b", "c"], ["329MB", "450MB"])
    assert chosen["capacity"]["window"] == "a" and chosen["capacity"]["budget"] == "329MB"
    assert chosen["light"] == {"window": "a", "budget": "450MB", "fp16": 0.0, "w8a8": 0.0, "fp16_roomy": 0.02}
    assert chosen["capacity-beyond"] is None and chosen["compute"] is None
