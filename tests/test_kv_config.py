import json

import pytest

from morphserve.runtime.shrink import preemption_order
from morphserve.errors import MorphServeError
from morphserve.runtime.config import parse
from tests.conftest import morphserve_cli


def test_preempt_every_holder_of_a_busy_block_least_progress_first():
    owners = {40: ["a"], 41: ["b", "c"], 5: ["d"]}
    progress = {"a": 900, "b": 10, "c": 300, "d": 0}
    assert preemption_order([40, 41], owners, progress) == ["b", "c", "a"]


@pytest.mark.parametrize("raw, key", [
    ({"pack": "p", "shrink_strategy": "evict"}, "shrink_strategy"),
    ({"pack": "p", "memory_budget_gb": -1}, "memory_budget_gb"),
    ({"pack": "p", "memory_budget_gb": "lots"}, "memory_budget_gb"),
])
def test_bad_kv_settings_name_the_key(raw, key):
    with pytest.raises(MorphServeError, match=key):
        parse(raw)


@pytest.mark.quant
def test_serve_passes_kv_settings_and_refuses_a_budget_below_the_weights(model_dir, pack_dir):
    ok = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--memory-budget-gb", "0.5",
                        "--shrink-strategy", "migrate", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    cfg = json.loads(ok.stdout.split("--additional-config ")[1].split(" --enforce-eager")[0])["morphserve"]
    assert cfg["memory_budget_gb"] == 0.5 and cfg["shrink_strategy"] == "migrate"
    bad = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--memory-budget-gb", "0.1", "--dry-run")
    assert bad.returncode == 2 and "below the fp16 weights" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.quant
def test_serve_compiles_only_when_asked_and_refuses_compile_with_enforce_eager(model_dir, pack_dir):
    eager = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--dry-run")
    assert eager.returncode == 0 and "--enforce-eager" in eager.stdout, eager.stderr
    compiled = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--compile", "--dry-run")
    assert compiled.returncode == 0, compiled.stderr
    assert "--enforce-eager" not in compiled.stdout
    cfg = json.loads(compiled.stdout.split("--additional-config ")[1].strip())["morphserve"]
    assert cfg["compile"] is True
    both = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--compile", "--dry-run", "--enforce-eager")
    assert both.returncode == 2 and "drop one" in both.stderr and "Traceback" not in both.stderr
