"""oneDNN's kernel cache: bounded for every server MorphServe starts, and the bound takes
effect in vLLM's own linear kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from morphserve.runtime import onednn_cache
from morphserve.runtime.onednn_cache import ONEDNN_CACHE_ENV

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_bound_is_a_default_an_operator_can_override():
    assert onednn_cache.bounded({})[ONEDNN_CACHE_ENV] == str(onednn_cache.DEFAULT_CAPACITY)
    assert onednn_cache.bounded({ONEDNN_CACHE_ENV: "1024"})[ONEDNN_CACHE_ENV] == "1024"
    assert onednn_cache.capacity({}) == onednn_cache.ONEDNN_DEFAULT
    assert onednn_cache.capacity({ONEDNN_CACHE_ENV: "0"}) == 0
    assert onednn_cache.capacity({ONEDNN_CACHE_ENV: "lots"}) == onednn_cache.ONEDNN_DEFAULT


def test_every_server_the_harness_starts_gets_the_bound(tmp_path, monkeypatch):
    from morphserve.harness.servers import run_in_group

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    log = tmp_path / "env.log"
    code = f"import os; print(os.environ.get({ONEDNN_CACHE_ENV!r}))"
    assert run_in_group([sys.executable, "-c", code], log) == 0
    assert log.read_text().strip() == str(onednn_cache.DEFAULT_CAPACITY)


_GROWTH = """
import os, random, torch
from morphserve.runtime.proc_memory import process_rss
from morphserve.vllm.kernels import random_compute
torch.set_num_threads(1)
# two linears of one shape (a narrow one: the kernels' memory follows the step's tokens, and
# this keeps the arithmetic to seconds), fed 400 token counts, more than vLLM's own cache of
# 32 per linear holds, as a server's mixed steps feed them
gen = torch.Generator().manual_seed(0)
hs = [random_compute("bf16", 128, 576, 64, torch.bfloat16, gen, scale=1e-3) for _ in range(2)]
x, empty = torch.randn(3000, 576, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16)
for h in hs: h(x[:4], empty, None)
before = process_rss(os.getpid())["rss_anon_bytes"]
for m in random.Random(0).sample(range(1000, 3000), 400):
    for h in hs: h(x[:m], empty, None)
print(process_rss(os.getpid())["rss_anon_bytes"] - before)
"""


def _growth(capacity: str) -> int:
    import os

    env = {**os.environ, ONEDNN_CACHE_ENV: capacity}
    out = subprocess.run([sys.executable, "-c", _GROWTH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_bound_keeps_vllms_kernels_from_growing_with_each_new_batch_shape():
    """With oneDNN's default, every new token count leaves a compiled kernel (megabytes for a
    large one) in its global cache; bounded, only vLLM's own 32 per linear stay. Where vLLM's
    bf16 linears are not oneDNN (AMX: sgl), there is nothing to bound."""
    from morphserve.vllm.platform_facts import kernel_paths

    path = kernel_paths(128, 576).bf16
    if not path.startswith("oneDNN"):
        pytest.skip(f"vLLM's bf16 linears are not oneDNN on this CPU ({path})")
    unbounded, bounded = _growth("1024"), _growth(str(onednn_cache.DEFAULT_CAPACITY))
    assert unbounded > 2 * bounded + (32 << 20), (unbounded >> 20, bounded >> 20)


_VLLM_SERVE_PATH = """
import os, sys
from morphserve.vllm.plugin import register
register()
from vllm import EngineArgs
model, pack = sys.argv[1], sys.argv[2]
EngineArgs(model=model).create_engine_config()
print("plain:", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
EngineArgs(model=model, additional_config={"morphserve": {"pack": pack}}).create_engine_config()
print("morphserve:", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
"""


def test_vllm_serve_with_morphserve_bounds_the_engine_it_spawns_and_plain_vllm_is_untouched(model_dir, pack_dir):
    """`vllm serve --additional-config '{"morphserve": ...}'` builds its config with the
    plugin loaded in the API server, which then spawns the engine with its environment; a
    vLLM without a morphserve config keeps oneDNN's default even with the plugin installed."""
    import os

    env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", _VLLM_SERVE_PATH, str(model_dir), str(pack_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("plain:", "morphserve:"))]
    assert lines == ["plain: None", f"morphserve: {onednn_cache.DEFAULT_CAPACITY}"], out.stdout[-2000:]
