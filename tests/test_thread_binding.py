"""CPU lists per tensor-parallel rank where vLLM's automatic binding stops (pure logic), and
`morphserve serve` passing them on."""

from __future__ import annotations

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
