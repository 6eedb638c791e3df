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
