"""A served tier slower than full precision under load is named at start (pure logic and the
controller's reading of a kernel profile through a fake engine: no vLLM)."""

import logging

import pytest

from morphserve.runtime.tier_speed import SLOW_FRACTION, slow_tiers

# One decoder layer's linears, seconds by batch, as `morphserve doctor` timed them on a Zen 5
# EPYC (W4A16 at 0.48x bf16 at batch 32) and on an AMX Xeon (W4A16's AMX kernel faster than bf16).
ZEN5 = {"bf16": {1: 186e-6, 32: 382e-6, 256: 1989e-6}, "w8a8": {1: 144e-6, 32: 253e-6, 256: 1220e-6},
        "w4a16": {1: 266e-6, 32: 796e-6, 256: 4973e-6}}
AMX = {"bf16": {1: 300e-6, 32: 600e-6}, "w8a8": {1: 250e-6, 32: 400e-6}, "w4a16": {1: 200e-6, 32: 500e-6}}


def test_a_tier_under_the_fraction_at_batch_32_is_slow_and_one_at_or_over_it_is_not():
    assert slow_tiers(ZEN5, ["w8a8", "w4a16"]) == {"w4a16": pytest.approx(382 / 796)}
    assert slow_tiers(AMX, ["w8a8", "w4a16"]) == {}
    at_the_line = {"bf16": {32: 1.0}, "w8a8": {32: 1.0}, "w4a16": {32: 1 / SLOW_FRACTION}}
    assert slow_tiers(at_the_line, ["w8a8", "w4a16"]) == {}
    just_under = {**at_the_line, "w4a16": {32: 1 / SLOW_FRACTION * 1.01}}
    assert list(slow_tiers(just_under, ["w8a8", "w4a16"])) == ["w4a16"]


def test_the_only_tier_served_is_never_called_slow_and_a_profile_without_batch_32_says_nothing():
    assert slow_tiers(ZEN5, ["w4a16"]) == {}  # dropping it would leave no ladder: nothing to say
    assert slow_tiers({"bf16": {1: 1.0}, "w8a8": {1: 9.0}, "w4a16": {1: 9.0}}, ["w8a8", "w4a16"]) == {}
    assert slow_tiers({"w8a8": {32: 1.0}, "w4a16": {32: 9.0}}, ["w8a8", "w4a16"]) == {}  # no full precision timed


class ProfileEngine:
    def __init__(self, profile):
        self.profile = profile

    def rpc(self, method, *args):
        assert method == "morphserve_tier_speed"
        return [{"seconds": {t: {str(b): s for b, s in v.items()} for t, v in self.profile.items()},
                 "source": "cached: test", "dtype": "bfloat16"}]


@pytest.mark.parametrize("profile, slow", [(ZEN5, ["w4a16"]), (AMX, [])])
def test_the_controller_names_a_slow_tier_once_it_reads_the_profile_and_still_serves_it(profile, slow, tmp_path,
                                                                                          caplog):
    from morphserve.offline import pack as packfmt
    from morphserve.runtime.config import MorphConfig
    from morphserve.runtime.controller import MorphController
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    pack = make_tiered_pack(tmp_path / "tiered", make_model(tmp_path / "model"))
    config = MorphConfig.model_validate({"pack": str(pack), "tiers": ["w8a8", "w4a16"]})
    controller = MorphController(config, ProfileEngine(profile), packfmt.load_manifest(pack), None)
    with caplog.at_level(logging.WARNING, logger="morphserve"):
        seconds = controller.tier_speed()
    assert seconds["w4a16"][32] == profile["w4a16"][32]  # the policy gets the profile as before
    assert list(controller.slow_tiers) == slow
    assert controller.ladder.tier_names == ["w8a8", "w4a16"]  # said, not acted on
    warned = [r.getMessage() for r in caplog.records if "tier runs at" in r.getMessage()]
    if slow:
        assert len(warned) == 1 and "w4a16 tier runs at 0.48x" in warned[0] and "`--tiers w8a8`" in warned[0]
    else:
        assert warned == []
