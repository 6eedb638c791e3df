"""CPU lists per tensor-parallel rank where vLLM's automatic binding stops (pure logic), and
`morphserve serve` passing them on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from morphserve.cli.serve import tensor_parallel_size
from morphserve.runtime import thread_binding
from tests.conftest import morphserve_cli


@pytest.mark.parametrize("cpus,nodes,ranks,expected", [
    ([0, 1], 1, 3, "0|1|0"),  # fewer cores than ranks: shared in turn
    ([0, 1], 1, 2, "0|1"),
    ([0, 1, 2, 3, 4], 1, 2, "0,1,2|3,4"),  # contiguous runs, the first rank one core more
    ([4, 5, 6, 7], 1, 2, "4,5|6,7"),  # only the CPUs this process may use
    ([0, 1], 2, 2, None),  # a NUMA node per rank: vLLM's `auto` works
    ([0, 1], 1, 1, None),  # one rank: nothing to supply
])
def test_plan(cpus, nodes, ranks, expected):
    assert thread_binding.plan(cpus, nodes, ranks) == expected


def test_an_operators_binding_wins():
    env = {thread_binding.ENV: "0-1|0-1|0-1"}
    assert thread_binding.supply(env, 3) is None and env[thread_binding.ENV] == "0-1|0-1|0-1"


@pytest.mark.parametrize("extra,size", [
    (["--tensor-parallel-size", "3"], 3), (["--tensor-parallel-size=3"], 3), (["-tp", "3"], 3), ([], 1),
    (["--tensor-parallel-size", "x"], 1),
])
def test_serve_reads_the_tensor_parallel_size_it_passes_on(extra, size):
    assert tensor_parallel_size(["--max-model-len", "1024", *extra]) == size


@pytest.mark.quant
def test_serve_passes_the_size_and_names_the_binding_it_supplies(model_dir, pack_dir):
    proc = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--tensor-parallel-size", "3",
                          "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--tensor-parallel-size 3" in proc.stdout
    supplied = thread_binding.numa_node_count() < 3
    assert (f"{thread_binding.ENV}=" in proc.stderr) == supplied, proc.stderr


_VLLM_SERVE_PATH = """
import os, sys
from morphserve.errors import MorphServeError
from morphserve.vllm.plugin import register
register()
from vllm import EngineArgs
model, pack = sys.argv[1], sys.argv[2]
EngineArgs(model=model, tensor_parallel_size=3).create_engine_config()
print("plain:", os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
config = EngineArgs(model=model, tensor_parallel_size=3, additional_config={"morphserve": {"pack": pack}}
                    ).create_engine_config()
print("morphserve:", config.parallel_config.tensor_parallel_size, os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
try:
    EngineArgs(model=model, pipeline_parallel_size=2, additional_config={"morphserve": {"pack": pack}}
               ).create_engine_config()
except MorphServeError as e:
    print("pipeline:", e)
"""


@pytest.mark.quant
def test_vllm_serves_config_path_accepts_three_ranks_supplies_the_binding_and_refuses_pipelines(model_dir, pack_dir):
    """What `vllm serve --tensor-parallel-size 3 --additional-config '{"morphserve": ...}'`
    runs in its API server before it spawns the engine (docs/RESULTS.md has the served run)."""
    env = {k: v for k, v in os.environ.items() if k != thread_binding.ENV}
    out = subprocess.run([sys.executable, "-c", _VLLM_SERVE_PATH, str(model_dir), str(pack_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("plain:", "morphserve:", "pipeline:"))]
    expected = thread_binding.plan(sorted(os.sched_getaffinity(0)), thread_binding.numa_node_count(), 3)
    assert lines == ["plain: None", f"morphserve: 3 {expected}",
                     "pipeline: MorphServe supports tensor parallelism only; --pipeline-parallel-size is 2 (run one "
                     "MorphServe server per replica behind a router: docs/SCALE_OUT.md)"], out.stdout[-2000:]
