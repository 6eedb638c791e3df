"""scripts/bench_serving_batch.py's system names and its refusals, as pure logic (no server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_serving_batch",
                                              Path(__file__).parent.parent / "scripts/bench_serving_batch.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("name, expected", [
    ("plain", ("plain", [])),
    ("held", ("held", [])),
    ("policy", ("policy", [])),
    ("held-trim-5", ("held", ["--heap-trim-interval", "5"])),
    ("policy-trim-0.5", ("policy", ["--heap-trim-interval", "0.5"])),
    ("held-grow-32", ("held", ["--heap-trim-min-growth-mb", "32"])),
    ("held-trim-off", ("held", ["--heap-trim-interval", "0"])),
    ("held-once", ("held-once", [])),
    ("held-once-grow-32", ("held-once", ["--heap-trim-min-growth-mb", "32"])),
    ("held-front", ("held", ["--frontend-cpus", "auto"])),
    ("held-trim-off-front", ("held", ["--heap-trim-interval", "0", "--frontend-cpus", "auto"])),
])
def test_a_system_name_is_a_server_and_its_trim_flags(name, expected):
    assert bench.trim_args(name) == expected


@pytest.mark.parametrize("name", ["plain-trim-5", "held-trim-x", "held-trim-0", "held-grow-", "bogus", "plain-front",
                                  "held-trim-x-front"])
def test_a_name_that_is_no_system_is_refused_in_one_line(name, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tmp_path), "--pack", str(tmp_path), "--systems", f"plain,{name}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown system(s) {name}" in err and "Traceback" not in err


def test_a_pack_without_a_w8a8_tier_is_refused_before_any_server_starts(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tmp_path), "--pack", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "--pack" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_every_server_gets_the_same_bounded_onednn_kernel_cache(tmp_path, monkeypatch):
    """`morphserve serve` bounds oneDNN's kernel cache in its processes; plain vLLM gets the same
    bound here, as in the evaluation, so the two differ in MorphServe alone."""
    import argparse

    from morphserve.runtime.onednn_cache import DEFAULT_CAPACITY, ONEDNN_CACHE_ENV
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    model = make_model(tmp_path / "model")
    args = argparse.Namespace(model=str(model), pack=str(make_tiered_pack(tmp_path / "pack", model)), policy="default",
                              max_model_len=2048, dtype="bfloat16", kv_mb=160)
    for system in ("plain", "held"):
        cmd, env = bench.command(system, args, 1)
        assert env[ONEDNN_CACHE_ENV] == str(DEFAULT_CAPACITY), system
