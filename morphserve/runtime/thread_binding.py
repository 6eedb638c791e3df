"""A CPU list per tensor-parallel rank where vLLM's automatic binding cannot make one.

vLLM's CPU backend binds each rank's OpenMP threads to cores (VLLM_CPU_OMP_THREADS_BIND).
Its default, `auto`, gives every rank a NUMA node of its own and stops with an assertion
when there are fewer nodes than ranks: a one-node machine (a laptop, a small VM, this
project's 2-core CI) cannot run `--tensor-parallel-size 2` without a hand-written list.
MorphServe supplies one in that case only: the CPUs this process may use, dealt out to the
ranks in turn (ranks share cores when there are more ranks than cores). An operator's own
value always wins. Plain Python: the facts are passed in.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "VLLM_CPU_OMP_THREADS_BIND"


def plan(cpus: list[int], numa_nodes: int, ranks: int) -> str | None:
    """The binding to supply, or None where vLLM's own `auto` works (one rank, or a NUMA
    node per rank)."""
    if ranks <= 1 or numa_nodes >= ranks or not cpus:
        return None
    return "|".join(",".join(map(str, cpu_list)) for cpu_list in deal(cpus, ranks))


def deal(cpus: list[int], parts: int) -> list[list[int]]:
    """The CPUs dealt out to `parts` users: contiguous runs, the first one CPU more where they
    do not divide; where there are fewer CPUs than users, they share, in turn."""
    cpus = sorted(cpus)
    if len(cpus) < parts:
        return [[cpus[r % len(cpus)]] for r in range(parts)]
    size, extra = divmod(len(cpus), parts)
    lists, start = [], 0
    for r in range(parts):
        end = start + size + (r < extra)
        lists.append(cpus[start:end])
        start = end
    return lists


def numa_node_count(root: Path = Path("/sys/devices/system/node")) -> int:
    return max(1, len(list(root.glob("node[0-9]*"))))


def supply(env: dict, ranks: int) -> str | None:
    """Set the binding in `env` if vLLM's `auto` would fail for `ranks`; returns what was set."""
    if env.get(ENV, "auto") != "auto":
        return None
    binding = plan(sorted(os.sched_getaffinity(0)), numa_node_count(), ranks)
    if binding is not None:
        env[ENV] = binding
    return binding
