"""Shared fixtures: the real SmolLM2 model and one real pack, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Small but real settings: every stage runs (GPTQ through llm-compressor, the full greedy
# LIS search over all 30 layers, perplexity at every k) on fewer tokens than the default.
TINY_PREPARE = ["--gptq-samples", "8", "--gptq-seq-len", "256", "--lis-tokens", "255",
                "--lis-window", "256", "--eval-tokens", "1023", "--eval-window", "1024"]


def morphserve_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "morphserve.cli", *args], cwd=REPO,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"morphserve {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from morphserve.offline.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def block_bytes(model_dir: Path) -> int:
    """One KV block of the test model as vLLM's CPU backend allocates it (engine tests size
    the KV cache in whole blocks for an exact schedule)."""
    from morphserve.harness.kv_shape import kv_block_bytes

    return kv_block_bytes(model_dir, "bfloat16")


@pytest.fixture(scope="session")
def pack_dir(model_dir: Path, tmp_path_factory) -> Path:
    if os.environ.get("MORPHSERVE_TEST_PACK"):  # iterate on engine tests without re-preparing
        return Path(os.environ["MORPHSERVE_TEST_PACK"]).resolve()
    out = tmp_path_factory.mktemp("pack") / "smollm2"
    morphserve_cli("prepare", str(model_dir), "--out", str(out), *TINY_PREPARE, check=True)
    return out
