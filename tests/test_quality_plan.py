"""Which perplexity points `prepare` measures (quant_layers/quality.py), on a fake model."""

from __future__ import annotations

import math

from morphserve.offline.ladder import Ladder, Rung
from quant_layers import quality
from quant_layers.eval_windows import Windows

WINDOWS = Windows([[0] * 11])  # 10 scored tokens


class FakeModel:
    """Perplexity rises by 1 per W4A16 layer and 0.25 per W8A8 one; records what it measured."""

    def __init__(self):
        self.config: dict[int, str] = {}
        self.measured: list[dict[int, str]] = []

    def set_quantized(self, layers):
        self.config = {i: "base" for i in layers}

    def set_config(self, config):
        self.config = dict(config)

    def nll(self, windows):
        self.measured.append(dict(self.config))
        ppl = 10.0 + sum(1.0 if t == "base" else 0.25 for t in self.config.values())
        return math.log(ppl) * windows.scored_tokens, windows.scored_tokens


def test_every_lis_level_by_default_and_the_asked_ones_plus_fixed_points_otherwise():
    order = [5, 2, 7, 0, 1, 3, 4, 6]  # L = 8: baselines' checkpoints 2, 4, 6
    dense = quality.quality_curves(FakeModel(), WINDOWS, order, "t.txt", 11)
    assert sorted(map(int, dense["orders"]["lis"]["ppl"])) == list(range(9))
    model = FakeModel()
    sparse = quality.quality_curves(model, WINDOWS, order, "t.txt", 11, lis_points=[3])
    assert sorted(map(int, sparse["orders"]["lis"]["ppl"])) == [0, 2, 3, 4, 6, 8]
    assert abs(sparse["orders"]["lis"]["ppl"]["3"] - 13.0) < 1e-9
    # each configuration once: the 6 LIS points, and the two baselines at 2, 4 and 6
    assert len(model.measured) == 6 + 2 * 3
    assert len({tuple(sorted(c.items())) for c in model.measured}) == len(model.measured)


def test_the_tiered_check_reads_the_w4a16_point_the_sparse_curve_measured():
    # 4 layers: W8A8 frees 50 a layer, W4A16 a further 20 (bf16 -> W4A16: 70 a layer)
    order = [2, 0, 3, 1]
    ladder = Ladder([Rung(i, "w8a8", 50) for i in order] + [Rung(i, "w4a16", 20) for i in order])
    k = quality.w4_layers_freeing_as_much(ladder)
    assert k == 3  # 200 bytes freed by all-W8A8 need 3 layers at 70
    model = FakeModel()
    curves = quality.quality_curves(model, WINDOWS, order, "t.txt", 11, lis_points=[k])
    tiers = quality.tier_curves(model, WINDOWS, ladder, order, curves["orders"]["lis"]["ppl"])
    check = tiers["ladder"]["check"]
    assert check["w4a16_layers_freeing_as_much"] == 3 and abs(check["w4a16_ppl_there"] - 13.0) < 1e-9
    assert abs(check["all_w8a8_ppl"] - 11.0) < 1e-9 and check["ladder_cheaper"]
    assert sorted(map(int, tiers["ladder"]["ppl"])) == list(range(9))
