"""The policy a compiled engine runs: the slack is not applied where its kernel profile does
not measure the engine's path (policies.config.for_compiled_engine). Pure logic."""

from policies.config import PolicyConfig, for_compiled_engine, load_policy


def test_default_preset_loses_its_slack_when_compiled():
    cfg, _ = load_policy("default")
    assert cfg.further_slack > 0  # the preset rests inside the slack, eager
    compiled, why = for_compiled_engine(cfg)
    assert compiled.further_slack == 0.0
    assert "compiled" in why and f"{cfg.further_slack:g}" in why
    # nothing else moves
    assert compiled.model_dump(exclude={"further_slack"}) == cfg.model_dump(exclude={"further_slack"})
    assert cfg.further_slack > 0  # the loaded preset itself is not changed


def test_a_policy_without_slack_is_unchanged():
    cfg = PolicyConfig(policy="demand")
    same, why = for_compiled_engine(cfg)
    assert same is cfg and why is None


def test_the_loop_starts_a_compiled_engine_without_the_slack():
    from morphserve.runtime.policy_loop import PolicyLoop

    capacities = [19 + k for k in range(31)]
    quality = {"fp16_ppl": 10.0, "orders": {"lis": {"ppl": {str(k): 10.0 + 0.01 * k for k in range(31)}}}}
    mix = [{"bf16": 30 - k, "w8a8": k} for k in range(31)]
    for compiled, slack in ((False, load_policy("default")[0].further_slack), (True, 0.0)):
        loop = PolicyLoop(None)
        loop.start("default", quality, capacities, mix, compiled=compiled)
        assert loop.policy.cfg.further_slack == slack, compiled
