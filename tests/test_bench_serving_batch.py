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
    ("held-cold-off", ("held", ["--kv-cold-tail", "off"])),
    ("held-trim-off-cold-off", ("held", ["--heap-trim-interval", "0", "--kv-cold-tail", "off"])),
    ("held-front-cold-off", ("held", ["--frontend-cpus", "auto", "--kv-cold-tail", "off"])),
])
def test_a_system_name_is_a_server_and_its_trim_flags(name, expected):
    assert bench.trim_args(name) == expected


@pytest.mark.parametrize("name", ["plain-trim-5", "held-trim-x", "held-trim-0", "held-grow-", "bogus", "plain-front",
                                  "held-trim-x-front", "plain-cold-off", "held-trim-x-cold-off"])
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
                              max_model_len=2048, dtype="bfloat16", kv_mb=160, huge_pages="off",
                              compile=False)
    for system in ("plain", "held"):
        cmd, env = bench.command(system, args, 1)
        assert env[ONEDNN_CACHE_ENV] == str(DEFAULT_CAPACITY), system


def test_huge_pages_reach_plain_vllm_and_morphserve_alike(tmp_path, monkeypatch):
    """Plain vLLM gets the environment `morphserve serve --huge-pages` would give itself, and
    MorphServe is told the same mode, so a comparison differs in MorphServe alone."""
    import argparse

    from morphserve.runtime import huge_pages
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    for name in (huge_pages.TORCH_ENV, huge_pages.TUNABLES_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huge_pages, "kernel_mode", lambda *a, **k: "madvise")
    model = make_model(tmp_path / "model")
    pack = make_tiered_pack(tmp_path / "pack", model)
    for mode in ("auto", "off"):
        args = argparse.Namespace(model=str(model), pack=str(pack), policy="default", max_model_len=2048,
                                  dtype="bfloat16", kv_mb=160, huge_pages=mode, compile=False)
        _, plain_env = bench.command("plain", args, 1)
        held_cmd, _ = bench.command("held", args, 1)
        assert held_cmd[held_cmd.index("--huge-pages") + 1] == mode
        assert (plain_env.get(huge_pages.TORCH_ENV) == "1") == (mode == "auto"), mode


def test_compile_reaches_plain_vllm_and_morphserve_alike(tmp_path):
    """--compile runs plain vLLM at its own default (no --enforce-eager) and MorphServe with
    --compile; without it both are eager: the comparison differs in MorphServe alone."""
    import argparse

    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    pack = make_tiered_pack(tmp_path / "pack", model)
    for compiled in (True, False):
        args = argparse.Namespace(model=str(model), pack=str(pack), policy="default", max_model_len=2048,
                                  dtype="bfloat16", kv_mb=160, huge_pages="off", compile=compiled)
        plain_cmd, _ = bench.command("plain", args, 1)
        held_cmd, _ = bench.command("held", args, 1, tmp_path / "t.jsonl")
        assert ("--enforce-eager" in plain_cmd) is not compiled
        assert ("--enforce-eager" in held_cmd) is not compiled
        assert ("--compile" in held_cmd) is compiled
        assert held_cmd[held_cmd.index("--transition-log") + 1] == str(tmp_path / "t.jsonl")


def test_hp_suffix_asks_morphserve_for_huge_pages_alone():
    assert bench.trim_args("held-hp") == ("held", ["--huge-pages", "auto"])
    assert bench.trim_args("policy-trim-off-hp") == ("policy", ["--heap-trim-interval", "0", "--huge-pages", "auto"])
    assert bench.trim_args("plain-hp") == ("plain-hp", [])
