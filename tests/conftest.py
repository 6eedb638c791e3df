"""Shared fixtures: the real SmolLM2 model and one real pack, built once per test session."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.parallel import PACK_FIXTURES, build_once, module_order, pin_this_worker, shared_root

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    pin_this_worker()  # under `make test`'s workers: this worker's own cores (tests/parallel.py)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules in the order tests/parallel.py gives (workers take whole modules in this order;
    every worker collects the same order)."""
    needs_pack: dict[str, bool] = {}
    for item in items:
        name = item.path.name
        needs_pack[name] = needs_pack.get(name, False) or bool(PACK_FIXTURES & set(item.fixturenames))
    rank = {name: i for i, name in enumerate(module_order(needs_pack))}
    items.sort(key=lambda item: rank[item.path.name])  # stable: a module's tests keep their order


TIMELINE_ENV = "MORPHSERVE_TEST_TIMELINE"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """With MORPHSERVE_TEST_TIMELINE=FILE, one JSON line per test: worker, start, end (wall
    clock). pytest's --durations gives each phase's length, not when it ran on which worker,
    which is what balancing the two workers (tests/parallel.py) needs."""
    path = os.environ.get(TIMELINE_ENV)
    start = time.time()
    try:
        return (yield)
    finally:
        if path:
            line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid,
                    "start": round(start, 2), "end": round(time.time(), 2)}
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")

# Small but real settings: every stage runs (GPTQ through llm-compressor, the full greedy
# LIS search over all 30 layers, perplexity at every k) on fewer tokens than the default:
# a sixteenth of the default LIS tokens and of the evaluation tokens, enough for
# the tests (4-bit costs this model ~20% perplexity; they check shapes, orders, agreement with
# vLLM and the mechanism), not for the curves' precision. (The issue-25 timing of prepare at
# 255 / 1,023 tokens is a benchmark in docs/RESULTS.md, not this fixture.)
TINY_PREPARE = ["--gptq-samples", "8", "--gptq-seq-len", "256", "--lis-tokens", "63",
                "--lis-window", "64", "--eval-tokens", "511", "--eval-window", "512"]


def morphserve_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "morphserve.cli", *args], cwd=REPO,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"morphserve {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


@functools.lru_cache(maxsize=None)
def tier_verdicts() -> dict[str, str | None]:
    """Each tier's kernel probed on this CPU (None: it runs here), as `serve` probes it. Under
    MORPHSERVE_TEST_HIDE_OPS=cpu_gemm_wna16 this machine answers as an AVX2 one would."""
    from morphserve.vllm.kernels import probe_tiers

    return probe_tiers(["w8a8", "w4a16"])


def need_tier(tier: str) -> None:
    """Skip, with the reason, a test whose subject is a tier this CPU's vLLM build lacks; the
    same mechanism is covered through the tier it has (the session pack is built in it)."""
    why = tier_verdicts()[tier]
    if why is not None:
        pytest.skip(f"needs vLLM's {tier} kernel, which this CPU lacks: {why}")


@pytest.fixture
def needs_w4a16() -> None:
    need_tier("w4a16")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return _model()


def _model() -> Path:
    from morphserve.offline.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def block_bytes(model_dir: Path) -> int:
    """One KV block of the test model as vLLM's CPU backend allocates it (engine tests size
    the KV cache in whole blocks for an exact schedule)."""
    from morphserve.harness.kv_shape import kv_block_bytes

    return kv_block_bytes(model_dir, "bfloat16")


@pytest.fixture(scope="session")
def fast_dtype() -> str:
    """The dtype this CPU computes fastest: bf16 where it has bf16 instructions, fp32 where
    torch emulates bf16 (measured on a 2-core AVX2 EPYC, SmolLM2 in plain vLLM, 12 prompts of
    300 tokens: prefill 48.1 s in bf16 against 7.3 s in fp32, 60 decode steps 67.3 against
    24.9 s). Engine tests whose subject does not depend on the dtype (KV resizing) use it."""
    from quant_layers.cpu_kind import this_cpu

    return "bfloat16" if this_cpu().native_bf16 else "float32"


@pytest.fixture(scope="session")
def pack_dir(model_dir: Path, tmp_path_factory) -> Path:
    """The session's pack in one tier: W4A16 where vLLM's build runs its kernel, a W8A8-only
    pack where it does not (AVX2), so every engine test swaps through a tier the machine
    really serves."""
    if os.environ.get("MORPHSERVE_TEST_PACK"):  # iterate on engine tests without re-preparing
        return Path(os.environ["MORPHSERVE_TEST_PACK"]).resolve()
    root = shared_root(tmp_path_factory.getbasetemp(), os.environ)
    return build_once(root, "pack", _build_session_pack) / "smollm2"


def _build_session_pack(folder: Path) -> None:
    out = folder / "smollm2"
    # Named, not `auto`: auto also drops a tier measured slow here (an AMD EPYC's W4A16), and the
    # suite needs the same shape of session pack on every machine whose build runs the kernel.
    tier = "w4a16" if tier_verdicts()["w4a16"] is None else "w8a8"
    # A W8A8-only pack's twin by round-to-nearest: its GPTQ run took 153 s of a 299 s prepare
    # on a 2-core AVX2 EPYC, and no test reads the W8A8 twin's precision (only its agreement
    # with vLLM serving the same checkpoint).
    method = ["--w8a8-method", "rtn"] if tier == "w8a8" else []
    # Half TINY_PREPARE's evaluation tokens for a W8A8-only pack: its perplexity curves (41 of
    # them) were 147 s of a 205 s prepare on a 2-core AVX2 EPYC, while the other worker waited
    # for the pack, and its tests read the curve only as the figure charged per level (the
    # W8A8 curve's steps, ~0.1%, are inside a tiny pack's noise at either length).
    fewer = ["--eval-tokens", "255", "--eval-window", "256"] if tier == "w8a8" else []
    morphserve_cli("prepare", str(_model()), "--out", str(out), "--tiers", tier, *method, *TINY_PREPARE, *fewer,
                   check=True)


@pytest.fixture(scope="session")
def tiered_pack(model_dir: Path, pack_dir: Path, tmp_path_factory) -> Path:
    """A W8A8 + W4A16 pack: the session pack's W4A16 twin where it has one (else a GPTQ run),
    plus a W8A8 twin from llm-compressor (round-to-nearest), the W8A8 order taken from the
    W4A16 one to keep the test's prepare short."""
    if os.environ.get("MORPHSERVE_TEST_TIERED_PACK"):  # iterate on engine tests without re-preparing
        return Path(os.environ["MORPHSERVE_TEST_TIERED_PACK"]).resolve()
    root = shared_root(tmp_path_factory.getbasetemp(), os.environ)
    return build_once(root, "tiered", lambda folder: _build_tiered_pack(folder / "pack", pack_dir)) / "pack"


def _build_tiered_pack(out: Path, pack_dir: Path) -> None:
    reuse = ["--quantized", str(pack_dir / "quantized")] if (pack_dir / "quantized").is_dir() else []
    # A W8A8-only session pack (AVX2) already holds a round-to-nearest W8A8 twin of the same
    # model: the one this pack would build (23 s of its prepare there).
    reuse_w8 = ["--quantized-w8a8", str(pack_dir / "quantized-w8a8")] if (pack_dir / "quantized-w8a8").is_dir() else []
    # Where this CPU's vLLM build has no W4A16 kernel (AVX2) the W4A16 twin is never served, only
    # checked and refused: round-to-nearest instead of GPTQ (163 s of a 298 s prepare on a 2-core
    # AVX2 EPYC).
    if not reuse and tier_verdicts()["w4a16"] is not None:
        reuse = ["--w4a16-method", "rtn"]
    # Fewer tokens than TINY_PREPARE: its tests need the tiers, the ladder's every level and
    # the all-W8A8 agreement with vLLM, not precise curves (7.5 minutes -> about 1.5 here;
    # the 60-level ladder's perplexities were 49 of its 126 s on one core of a 2-vCPU AVX2
    # EPYC at 255 tokens).
    small = ["--gptq-samples", "8", "--gptq-seq-len", "256", "--lis-tokens", "32", "--lis-window", "32",
             "--eval-tokens", "127", "--eval-window", "128"]
    method = reuse_w8 or ["--w8a8-method", "rtn"]
    morphserve_cli("prepare", str(_model()), "--out", str(out), "--tiers", "w8a8,w4a16", *reuse,
                   "--w8a8-order", "w4a16", *method, *small, check=True)


@pytest.fixture(scope="session")
def w4_pack_dir(pack_dir: Path) -> Path:
    """The session pack, for tests about its W4A16 twin itself; skipped where this CPU's pack
    is W8A8-only (no W4A16 kernel: the mechanism is covered through W8A8 by the others)."""
    if not (pack_dir / "quantized").is_dir():
        pytest.skip(f"the session pack is W8A8-only on this CPU: {tier_verdicts()['w4a16']}")
    return pack_dir
