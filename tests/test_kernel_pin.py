"""MorphServe serves the 4-bit kernel its pack's quality curve measured (W4A16)."""

from __future__ import annotations

import pytest

from morphserve.vllm import kernels as vp
from morphserve.errors import MorphServeError


def test_pin_sets_w4a16_and_refuses_an_explicit_w4a8(monkeypatch):
    from vllm import envs

    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    vp.pin_w4a16_kernel()
    assert envs.VLLM_CPU_INT4_W4A8 is False
    assert vp.wna16_variant(__import__("torch").bfloat16).endswith("-w4a16")
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")
    with pytest.raises(MorphServeError, match="unset VLLM_CPU_INT4_W4A8"):
        vp.pin_w4a16_kernel()


def test_describing_the_4bit_kernel_pins_w4a16_first(monkeypatch):
    """`doctor` and `prepare` never pin by themselves: they must still name and time the
    kernel serve runs, not vLLM's W4A8 path (the default on AMX CPUs)."""
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    assert vp.wna16_variant(__import__("torch").bfloat16).endswith("-w4a16")


def test_a_clean_process_runs_the_w4a16_kernel_it_probes(monkeypatch):
    """The tier probe's child is a process whose first AMX user is vLLM's W4A16 kernel, which
    does not ask Linux for the AMX tile state; on an AMX Xeon it died of SIGILL there and
    serve dropped the tier. Its parent's environment carries no W4A16 pin, as in `doctor`."""
    from morphserve.vllm.kernels import probe_tier
    from morphserve.vllm.probe_process import _run_child

    reason = probe_tier("w4a16")  # in this process: the kernel runs on this CPU, or why not
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.delenv("VLLM_CPU_INT4_W4A8", raising=False)
    assert _run_child(["w4a16"], "bfloat16", timeout_s=300) == {"w4a16": None}
