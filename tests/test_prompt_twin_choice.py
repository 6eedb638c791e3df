"""`prompt_twin_layers: auto`: the rule over a kernel profile (pure, milliseconds), its
config and CLI forms, and what the engine core does with it before the twins are built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from morphserve.runtime.prompt_twin_choice import choose_prompt_twins

# Kernel profiles as tier_speed caches them: seconds of one layer's linears per batch.
ZEN3_FP32 = {"bf16": {1: 0.855e-3, 8: 1.257e-3, 32: 2.598e-3, 256: 14.151e-3},  # this repo's AVX2 EPYC
             "w8a8": {1: 3.336e-3, 8: 5.851e-3, 32: 7.012e-3, 256: 13.477e-3}}
AMX_BF16 = {"bf16": {1: 1.0e-3, 8: 1.2e-3, 32: 2.0e-3, 256: 12.0e-3},  # int8 faster at every batch
            "w8a8": {1: 0.6e-3, 8: 0.7e-3, 32: 1.0e-3, 256: 5.0e-3}}
SLOW_INT8 = {"bf16": {1: 1.0e-3, 32: 2.0e-3, 256: 10.0e-3},  # int8 slower at every batch
             "w8a8": {1: 3.0e-3, 32: 4.0e-3, 256: 11.0e-3}}


def test_twins_for_every_layer_where_int8_loses_decodes_and_wins_prompts():
    choice = choose_prompt_twins(ZEN3_FP32, 30, ["w8a8"])
    assert choice.layers == 30
    assert "3.90x full precision's time at 1 row(s) and 0.95x at 256" in choice.why


@pytest.mark.parametrize("profile, reason", [
    (AMX_BF16, "int8 decodes as fast"),
    (SLOW_INT8, "int8 is no faster for a prompt's call"),
    (None, "no kernel profile"),
    ({"bf16": ZEN3_FP32["bf16"]}, "no kernel profile"),
    ({"bf16": ZEN3_FP32["bf16"], "w8a8": {1: 3.3e-3, 32: 7.0e-3}}, "no kernel profile"),  # int8 lacks 8 and 256
])
def test_no_twins_where_one_kernel_serves_both_phases_or_nothing_was_measured(profile, reason):
    choice = choose_prompt_twins(profile, 30, ["w8a8"])
    assert choice.layers == 0 and choice.why.startswith("none: ") and reason in choice.why


@pytest.mark.parametrize("tiers, twin", [(["w8a8", "w4a16"], "pack"), (["w4a16"], "pack"), (["w8a8"], "identity")])
def test_no_twins_off_a_w8a8_only_ladder_of_pack_twins_whatever_the_profile(tiers, twin):
    choice = choose_prompt_twins(ZEN3_FP32, 30, tiers, twin)
    assert choice.layers == 0 and "W8A8-only ladder of pack twins" in choice.why


def test_auto_is_a_config_value_and_a_cli_value_and_other_words_are_refused():
    from pydantic import ValidationError

    from morphserve.cli import commands
    from morphserve.runtime.config import MorphConfig

    assert MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": "auto"}).prompt_twin_layers == "auto"
    assert MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": 12}).prompt_twin_layers == 12
    for bad in ("all", -1):
        with pytest.raises(ValidationError):
            MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": bad})
    parser = commands.build_parser()
    args, _ = parser.parse_known_args(["serve", "m", "--pack", "p", "--prompt-twin-layers", "auto"])
    assert args.prompt_twin_layers == "auto"
    args, _ = parser.parse_known_args(["serve", "m", "--pack", "p", "--prompt-twin-layers", "7"])
    assert args.prompt_twin_layers == 7
    for bad in ("all", "-2"):
        with pytest.raises(SystemExit):
            parser.parse_known_args(["serve", "m", "--pack", "p", "--prompt-twin-layers", bad])


def test_the_frontend_settles_auto_to_none_off_a_w8a8_only_ladder_and_leaves_it_to_the_engine_on_one():
    from morphserve.runtime.config import MorphConfig, check_prompt_twins

    tiered = MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": "auto", "tiers": ["w8a8", "w4a16"]})
    check_prompt_twins(tiered, SimpleNamespace(num_layers=30))  # no error: auto holds none there
    assert tiered.prompt_twin_layers == 0
    w8 = MorphConfig.model_validate({"pack": "p", "prompt_twin_layers": "auto", "tiers": ["w8a8"], "twin": "pack"})
    check_prompt_twins(w8, SimpleNamespace(num_layers=30))
    assert w8.prompt_twin_layers == "auto"  # the engine core decides, with this machine's kernel profile


class FakeEngine:
    """Stands in for the boundary's EngineLink: records the workers' calls by name."""

    def __init__(self, profile):
        self.profile, self.calls = profile, []

    def rpc(self, method, *args):
        self.calls.append((method, args))
        if method == "morphserve_tier_speed":
            return [{"seconds": {t: {str(b): s for b, s in v.items()} for t, v in self.profile.items()},
                     "source": "cached: test", "dtype": "float32"}]
        raise RuntimeError("stop here: the test reads what morphserve_init was sent")


@pytest.mark.parametrize("profile, twinned", [(ZEN3_FP32, True), (AMX_BF16, False)])
def test_the_engine_core_times_the_kernels_before_the_twins_are_built_and_sends_the_count(profile, twinned,
                                                                                           tmp_path):
    from morphserve.offline import pack as packfmt
    from morphserve.runtime.controller import MorphController
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    pack = make_tiered_pack(tmp_path / "tiered", make_model(tmp_path / "model"))
    engine = FakeEngine(profile)
    with pytest.raises(RuntimeError, match="stop here"):
        MorphController.start({"pack": str(pack), "tiers": ["w8a8"], "prompt_twin_layers": "auto"}, engine, None)
    (first, _), (second, (sent,)) = engine.calls
    assert first == "morphserve_tier_speed" and second == "morphserve_init"
    layers = packfmt.load_manifest(pack).num_layers
    assert layers >= 2 and sent["prompt_twin_layers"] == (layers if twinned else 0)


def test_an_evaluation_charges_an_auto_system_by_the_count_its_server_reported():
    from pydantic import ValidationError

    from morphserve.evaluation.runner import twins_held
    from morphserve.evaluation.suite import System

    auto = System(name="m", kind="morphserve", policy="default", prompt_twin_layers="auto")
    assert twins_held(auto, {"prompt_twin_layers": 30, "served_by_level": {}}) == 30
    assert twins_held(auto, {"prompt_twin_layers": 0}) == 0
    assert twins_held(auto, None) == 0  # a server that never said: every token at its level
    assert twins_held(System(name="m", kind="morphserve", policy="default", prompt_twin_layers=20),
                      {"prompt_twin_layers": 30}) == 20  # a count in the suite is what was asked and held
    assert twins_held(System(name="m", kind="morphserve", policy="default"), None) == 0
    with pytest.raises(ValidationError):
        System(name="m", kind="morphserve", policy="default", prompt_twin_layers="every")
