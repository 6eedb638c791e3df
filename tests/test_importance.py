"""The greedy LIS ranking as pure logic: fake measurements, millisecond tests."""

import pytest

from quant_layers.importance import greedy_lis_order, lis


def test_weights_are_the_papers():
    assert lis(1.0, 0.0, 0.0) == 0.25
    assert lis(0.0, 1.0, 0.0) == 0.25
    assert lis(0.0, 0.0, 1.0) == 0.5


def test_mds_is_recomputed_each_round_and_changes_the_order():
    lts = {0: 0.9, 1: 0.9, 2: 0.9}
    lrs = {0: 0.9, 1: 0.9, 2: 0.9}
    calls = []

    def mds(q, candidates):
        calls.append((set(q), list(candidates)))
        # Layer 2 looks best alone, but once 2 is in, layer 0 hurts less than layer 1.
        if not q:
            return {0: 0.90, 1: 0.95, 2: 0.99}
        return {p: (0.97 if p == 0 else 0.80) for p in candidates}

    result = greedy_lis_order([0, 1, 2], lts, lrs, mds)
    assert result.order == [2, 0, 1]
    assert [c[0] for c in calls] == [set(), {2}, {0, 2}]
    assert [c[1] for c in calls] == [[0, 1, 2], [0, 1], [1]]
    assert result.rounds[1].scores[0]["mds"] == 0.97
    assert result.rounds[0].chosen == 2


def test_static_terms_break_mds_ties():
    lts = {0: 0.5, 1: 0.9}
    lrs = {0: 0.9, 1: 0.9}
    result = greedy_lis_order([0, 1], lts, lrs, lambda q, c: {p: 0.9 for p in c})
    assert result.order == [1, 0]


def test_ties_go_to_the_lower_layer_for_determinism():
    same = {0: 0.5, 1: 0.5, 2: 0.5}
    result = greedy_lis_order([2, 1, 0], same, same, lambda q, c: {p: 0.5 for p in c})
    assert result.order == [0, 1, 2]


def test_missing_static_scores_are_an_error():
    with pytest.raises(ValueError, match="missing"):
        greedy_lis_order([0, 1], {0: 1.0}, {0: 1.0, 1: 1.0}, lambda q, c: {})


def test_json_is_serialisable():
    import json

    result = greedy_lis_order([0, 1], {0: 1, 1: 0}, {0: 1, 1: 0}, lambda q, c: {p: 1.0 for p in c})
    data = json.loads(json.dumps(result.to_json()))
    assert data["order"] == [0, 1]
    assert len(data["rounds"]) == 2
    assert set(data["rounds"][0]["scores"]) == {"0", "1"}
