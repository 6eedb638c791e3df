"""The twin is what vLLM computes: prepare's perplexities match vLLM serving the checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.quant, pytest.mark.engine]


def test_prepare_perplexity_matches_vllm_static_serving(w4_pack_dir, tmp_path):
    out = tmp_path / "agreement.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "vllm_perplexity.py"), str(w4_pack_dir),
         "--tolerance", "0.01", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for row in result["rows"]:
        assert row["tokens"] == 511
        assert abs(row["rel_gap"]) <= 0.01, row
    assert proc.returncode == 0
