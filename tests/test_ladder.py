"""The ladder of configurations (pure logic): rungs, plans, and where a partial state sits."""

from __future__ import annotations

import pytest

from morphserve.offline import pack as packfmt
from morphserve.offline.ladder import Ladder


def manifest(tiered: bool) -> packfmt.Manifest:
    tiers = [packfmt.TierManifest(name="w8a8", format=packfmt.TIER_FORMATS["w8a8"], quantized_dir="quantized-w8a8",
                                  quantization_source="test", swap_order=[1, 2, 0], layer_bytes=[50, 50, 50])]
    return packfmt.Manifest(tool_version="t", model_path="/m", model_sha256="x", architecture="LlamaForCausalLM",
                            num_layers=3, bits=4, group_size=64, quantization_source="test", swap_order=[2, 0, 1],
                            layer_bytes=[packfmt.LayerBytes(layer=i, fp16=100, quantized=30) for i in range(3)],
                            tiers=tiers if tiered else [])


def test_without_tiers_the_ladder_is_the_w4_swap_order():
    ladder = Ladder.from_manifest(manifest(False))
    assert [(r.layer, r.tier) for r in ladder.rungs] == [(2, "w4a16"), (0, "w4a16"), (1, "w4a16")]
    assert ladder.savings == [70, 70, 70] and not ladder.tiered
    assert ladder.plan({}, 2).compress == [(2, "w4a16"), (0, "w4a16")]


def test_tiered_ladder_goes_to_w8a8_first_then_w4a16():
    ladder = Ladder.from_manifest(manifest(True))
    assert ladder.top == 6 and ladder.tiered
    assert [(r.layer, r.tier) for r in ladder.rungs] == [
        (1, "w8a8"), (2, "w8a8"), (0, "w8a8"), (2, "w4a16"), (0, "w4a16"), (1, "w4a16")]
    assert ladder.savings == [50, 50, 50, 20, 20, 20]
    assert ladder.config(3) == {0: "w8a8", 1: "w8a8", 2: "w8a8"}
    assert ladder.counts(4) == {"w8a8": 2, "w4a16": 1}
    assert ladder.config(6) == {0: "w4a16", 1: "w4a16", 2: "w4a16"}


def test_plans_compress_in_ladder_order_and_decompress_last_first():
    ladder = Ladder.from_manifest(manifest(True))
    up = ladder.plan({}, 5)  # a jump past the W8A8 rungs: layers 2 and 0 straight to W4A16
    assert up.compress == [(1, "w8a8"), (2, "w4a16"), (0, "w4a16")] and up.decompress == []
    down = ladder.plan(ladder.config(5), 1)
    assert down.compress == [] and down.decompress == [(0, "bf16"), (2, "bf16")]
    mid = ladder.plan(ladder.config(6), 3)  # back to all-W8A8
    assert mid.decompress == [(1, "w8a8"), (0, "w8a8"), (2, "w8a8")]


@pytest.mark.parametrize("level", range(7))
def test_level_of_every_rung(level):
    ladder = Ladder.from_manifest(manifest(True))
    assert ladder.level_of(ladder.config(level)) == level
    assert ladder.nearest_level(ladder.config(level)) == level


def test_a_partial_state_is_accounted_at_the_rung_every_layer_has_reached():
    ladder = Ladder.from_manifest(manifest(True))
    partial = {1: "w8a8", 2: "w4a16"}  # off the ladder: layer 2 jumped ahead, layer 0 still bf16
    assert ladder.level_of(partial) is None
    assert ladder.nearest_level(partial) == 2  # rungs 1 and 2 are covered; rung 3 (layer 0) is not


def test_a_tier_the_manifest_does_not_know_is_refused():
    m = manifest(True).model_dump()
    m["tiers"][0]["name"] = "w2a2"
    with pytest.raises(ValueError, match="unknown tier"):
        packfmt.Manifest.model_validate(m)
