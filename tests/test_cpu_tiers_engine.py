"""A CPU without vLLM's W4A16 kernel, on any machine: MORPHSERVE_TEST_HIDE_OPS=cpu_gemm_wna16
makes every process (plain engines included) answer as vLLM's AVX2 build does, with the same
AttributeError at the op's first call. A W4A16-only pack is refused at start-up in one line;
a tiered pack is served as a bf16 -> W8A8 ladder, never a 500; a compute that fails its proof
call is rolled back, not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from morphserve.harness.servers import free_port
from tests.engine_utils import REPO, running_server
from tests.test_http_control import _request

pytestmark = [pytest.mark.engine, pytest.mark.quant]
HIDE = {"MORPHSERVE_TEST_HIDE_OPS": "cpu_gemm_wna16"}


@pytest.fixture(scope="module", autouse=True)
def _session_pack_first(pack_dir):
    """This module runs first on one worker (tests/parallel.py) and builds the session pack;
    built before its probe tests rather than after (a minute of them), the other worker,
    whose modules that need no pack end about then, does not wait for it."""


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "morphserve.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_the_hidden_op_fails_like_the_avx2_build_and_the_probe_says_why():
    code = ("from morphserve.vllm.kernels import hide_ops_for_tests, probe_tier, op_available, TIER_OPS\n"
            "import morphserve.vllm.kernels as k\n"
            "hide_ops_for_tests()\n"
            "print(repr(probe_tier('w4a16')))\n"
            "k.op_available = lambda name: True  # past the op check: the kernel's own call must fail\n"
            "print(repr(probe_tier('w4a16')))\n"
            "print(repr(probe_tier('w8a8')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **HIDE})
    first, second, w8 = proc.stdout.strip().splitlines()[-3:]
    assert "cpu_gemm_wna16" in first and "cpu_gemm_wna16" in second, proc.stdout + proc.stderr
    assert w8 == "None"


def test_the_api_servers_probe_runs_in_a_child_and_agrees_with_the_in_process_one(monkeypatch, tmp_path):
    from morphserve.vllm import probe_process
    from morphserve.vllm.kernels import probe_tiers

    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))  # nothing kept yet: the child runs
    monkeypatch.setattr(probe_process, "_verdicts", {})
    here = probe_tiers(["w8a8", "w4a16"])
    assert probe_process.probe_tiers_in_child(["w8a8", "w4a16"]) == here
    kept = list((tmp_path / "kernel-probes").glob("*.json"))
    assert len(kept) == (1 if all(v is None for v in here.values()) else 0)  # only "every tier runs" is kept
    monkeypatch.setenv("MORPHSERVE_TEST_HIDE_OPS", "cpu_gemm_wna16")  # a new key: probed again, as on AVX2
    hidden = probe_process.probe_tiers_in_child(["w8a8", "w4a16"])
    assert hidden["w8a8"] is None and "cpu_gemm_wna16" in hidden["w4a16"]
    assert list((tmp_path / "kernel-probes").glob("*.json")) == kept  # a tier that does not run: not kept


def test_a_kept_verdict_spares_the_next_start_its_child(monkeypatch, tmp_path):
    from morphserve.vllm import probe_process

    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(probe_process, "_verdicts", {})
    answered = subprocess.CompletedProcess([], 0, probe_process.PREFIX + '["w8a8", null]\n', "")
    monkeypatch.setattr(probe_process.subprocess, "run", lambda cmd, **_kw: answered)
    assert probe_process.probe_tiers_in_child(["w8a8"]) == {"w8a8": None}
    monkeypatch.setattr(probe_process, "_verdicts", {})  # a new server process on the same machine

    def no_child(cmd, **_kw):
        raise AssertionError("probed again")

    monkeypatch.setattr(probe_process.subprocess, "run", no_child)
    assert probe_process.probe_tiers_in_child(["w8a8"]) == {"w8a8": None}


def test_a_probe_that_kills_its_child_drops_that_tier_with_the_signal(monkeypatch, tmp_path):
    from morphserve.vllm import probe_process

    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))

    def killed(cmd, **_kwargs):  # w8a8 answered, then the w4a16 call took the process down
        return subprocess.CompletedProcess(cmd, -11, probe_process.PREFIX + '["w8a8", null]\n', "Fatal Python error\n")

    monkeypatch.setattr(probe_process, "_verdicts", {})
    monkeypatch.setattr(probe_process.subprocess, "run", killed)
    verdict = probe_process.probe_tiers_in_child(["w8a8", "w4a16"])
    assert verdict["w8a8"] is None
    assert verdict["w4a16"] == "the probe of vLLM's w4a16 kernel ended its process (signal 11): Fatal Python error"
    assert not (tmp_path / "kernel-probes").exists()  # never kept: the next start probes again


def test_pack_check_names_each_tier_and_the_served_ladder(pack_dir, tiered_pack):
    ok = _cli("pack", "check", str(tiered_pack))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "w8a8: runs here" in ok.stdout and "served here as the ladder: bf16 -> w8a8" in ok.stdout
    hidden = _cli("pack", "check", str(tiered_pack), env=HIDE)
    assert hidden.returncode == 0 and "w4a16: does not run here" in hidden.stdout, hidden.stderr[-2000:]
    assert "served here as the ladder: bf16 -> w8a8\n" in hidden.stdout


def test_a_w4a16_only_pack_is_refused_at_start_up_in_one_line(model_dir, pack_dir):
    if json.loads((pack_dir / "manifest.json").read_text()).get("base_tier", "w4a16") != "w4a16":
        pytest.skip("the session pack is W8A8-only on this CPU (the refusal is unit-tested in test_cpu_tiers)")
    for args in (["pack", "check", str(pack_dir)],
                 ["serve", str(model_dir), "--pack", str(pack_dir), "--port", str(free_port())]):
        proc = _cli(*args, env=HIDE)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith("error: this CPU cannot serve the pack's w4a16 tier"), \
            proc.stderr[-2000:]
        assert "cpu_gemm_wna16" in last and "--tiers w8a8" in last and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def hidden_w4_server(model_dir, tiered_pack, tmp_path_factory):
    """`vllm serve` as a user types it, on an 'AVX2' machine, with a proof that fails once."""
    port = free_port()
    log = tmp_path_factory.mktemp("hidden-w4") / "server.log"
    env = {**os.environ, **HIDE, "VLLM_CPU_KVCACHE_SPACE": "1", "MORPHSERVE_TEST_FAULTS": "proof"}
    env.pop("VLLM_API_KEY", None)
    args = [str(model_dir), "--pack", str(tiered_pack), "--manual-min-interval", "0", "--max-model-len", "1024"]
    with running_server(args, env, log, port) as base:
        yield base, log


def _complete(base: str, model_dir) -> int:
    status, out = _request(base + "/v1/completions", {"model": str(model_dir), "prompt": "The capital of France is",
                                                       "max_tokens": 8, "temperature": 0}, key=None)
    assert status == 200 and out["choices"][0]["text"], out
    return status


def test_a_tiered_pack_is_served_as_a_w8a8_ladder_with_one_warning(hidden_w4_server, model_dir):
    base, log = hidden_w4_server
    state = _request(base + "/morphserve/state", key=None)[1]
    assert state["tiers"] == ["bf16", "w8a8"] and state["pack_tiers"] == ["bf16", "w8a8", "w4a16"]
    assert state["levels"] == 30
    warnings = [ln for ln in log.read_text().splitlines() if "without its w4a16 tier" in ln]
    assert len(warnings) == 1 and "cpu_gemm_wna16" in warnings[0]
    _complete(base, model_dir)


def test_a_failed_proof_rolls_back_and_the_top_rung_serves(hidden_w4_server, model_dir):
    base, _ = hidden_w4_server
    status, r = _request(base + "/morphserve/level", {"quantized_layers": 5}, key=None)
    assert status == 503 and "proof" in r["error"], r
    state = _request(base + "/morphserve/state", key=None)[1]
    assert state["quantized_layers"] == 0 and state["layer_tiers"] == {} and state["pinned_by_error"]
    _complete(base, model_dir)
    status, r = _request(base + "/morphserve/level", {"quantized_layers": 30}, key=None)
    assert status == 200 and r["quantized_layers"] == 30, r
    state = _request(base + "/morphserve/state", key=None)[1]
    assert state["tier_counts"] == {"w8a8": 30} and state["errors"] == 1
    _complete(base, model_dir)
    status, r = _request(base + "/morphserve/level", {"quantized_layers": 31}, key=None)
    assert status == 400  # no W4A16 rung above the W8A8 ones here
    assert _request(base + "/morphserve/level", {"quantized_layers": 0}, key=None)[0] == 200
    _complete(base, model_dir)
