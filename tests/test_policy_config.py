"""Policy YAML validation and `morphserve policy check` (no engine)."""

from __future__ import annotations

import pytest

from policies.config import PRESETS, PolicyError, load_policy
from tests.conftest import morphserve_cli


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid_and_ordered_like_the_paper_modes(preset):
    cfg, path = load_policy(preset)
    assert path.name == f"{preset}.yaml"
    # PRESETS lists the modes from most careful to most aggressive; this preset's quality
    # budget over time must sit strictly between its neighbours' budgets.
    i = PRESETS.index(preset)
    below = [load_policy(p)[0].max_avg_ppl_increase for p in PRESETS[:i]]
    above = [load_policy(p)[0].max_avg_ppl_increase for p in PRESETS[i + 1:]]
    assert cfg.policy == "demand" and cfg.max_avg_ppl_increase is not None
    assert all(c < cfg.max_avg_ppl_increase for c in below)
    assert all(cfg.max_avg_ppl_increase < c for c in above)


@pytest.mark.parametrize("text, message", [
    ("policy: threshold\nkv_high: 1.5\n", "kv_high: Input should be less than or equal to 1"),
    ("policy: threshold\nkv_hgh: 0.5\n", "unknown key 'kv_hgh'"),
    ("policy: threshold\nstep_layers: two\n", "step_layers: Input should be a valid integer"),
    ("policy: thresh\n", "policy: Input should be 'threshold', 'slo' or 'demand'"),
    ("policy: threshold\nkv_low: 0.9\n", "kv_low (0.9) must be below kv_high"),
    ("kv_high: 0.5\n", "policy: Field required"),
    ("policy: [threshold\n", "not valid YAML at line"),
    ("- a\n", "expected a mapping"),
    ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),  # safe_load refuses tags
])
def test_bad_policy_files_get_one_error_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_policy_check_cli(tmp_path):
    good = morphserve_cli("policy", "check", "default")
    assert good.returncode == 0 and "valid demand policy" in good.stdout and "max_avg_ppl_increase: 0.05" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: slo\ncooldown_s: -1\n")
    out = morphserve_cli("policy", "check", str(bad))
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "cooldown_s" in out.stderr
    assert "Traceback" not in out.stderr
    missing = morphserve_cli("policy", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
