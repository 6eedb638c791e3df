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


def _random_case(seed: int, n: int):
    import random

    rng = random.Random(seed)
    lts = {p: rng.random() for p in range(n)}
    lrs = {p: rng.uniform(0.95, 1.0) for p in range(n)}
    # MDS depends on the set already chosen and may rise or fall between rounds; a few
    # cases are exact ties, so the lower-layer rule is exercised too.
    def mds(q, candidates):
        return {p: min(1.0, 0.99 + 0.01 * random.Random(hash((tuple(sorted(q)), p, seed))).random())
                for p in candidates}
    return lts, lrs, mds


@pytest.mark.parametrize("seed", range(40))
def test_bounded_search_chooses_the_exhaustive_order(seed):
    n = 3 + seed % 12
    lts, lrs, mds = _random_case(seed, n)
    if seed % 5 == 0:  # equal static terms: every round is decided by MDS, with ties in bounds
        lts = {p: 0.5 for p in lts}
        lrs = {p: 0.99 for p in lrs}
    full = greedy_lis_order(range(n), lts, lrs, mds)
    measured = []
    bounded = greedy_lis_order(range(n), lts, lrs,
                               lambda q, c: measured.extend(c) or mds(q, c), mds_bound=1.0)
    assert bounded.order == full.order
    assert len(measured) <= n * (n + 1) // 2
    for rnd in bounded.rounds:
        assert set(rnd.scores) | set(rnd.skipped) == set(full.rounds[rnd.round].scores)
        assert not set(rnd.scores) & set(rnd.skipped)
        assert all(b < rnd.scores[rnd.chosen]["lis"] for b in rnd.skipped.values())


def test_bounded_search_skips_layers_whose_static_terms_cannot_win():
    lts = {0: 0.1, 1: 0.9, 2: 0.8}  # layer 0 transforms its input most: LIS <= 0.025 + 0.25 + 0.5
    lrs = {0: 1.0, 1: 1.0, 2: 1.0}
    calls = []
    result = greedy_lis_order([0, 1, 2], lts, lrs, lambda q, c: calls.append((set(q), list(c))) or
                              {p: 0.99 for p in c}, mds_bound=1.0)
    assert result.order == [1, 2, 0]
    # round 0 measures 1 (bound 0.975, LIS 0.97) then 2 (bound 0.95 < 0.97: skipped)
    assert calls == [(set(), [1]), ({1}, [2]), ({1, 2}, [0])]
    assert result.rounds[0].skipped == {2: pytest.approx(0.95), 0: pytest.approx(0.775)}
    assert result.to_json()["rounds"][0]["skipped"] == {"2": pytest.approx(0.95), "0": pytest.approx(0.775)}


def test_an_mds_above_its_bound_is_an_error_not_a_wrong_order():
    with pytest.raises(ValueError, match="exceeds its bound"):
        greedy_lis_order([0, 1], {0: 1, 1: 1}, {0: 1, 1: 1}, lambda q, c: {p: 1.5 for p in c}, mds_bound=1.0)
