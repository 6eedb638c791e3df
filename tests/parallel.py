"""How `make test` spreads the suite over the machine's cores (pytest-xdist, one module per
worker at a time).

Why: vLLM's CPU engine computes on one core here. Its automatic binding gives a
single-node machine's first core to the model and keeps the next one for its scheduler, so
a serial suite on a 2-core machine kept one core idle for most of its 40 minutes (user time
about equal to wall time). Two workers, each pinned to its own share of the cores, run two
engines side by side; vLLM's automatic binding honours the pin (it binds inside the CPUs
this process may use), and so does every server, probe and quantization a test starts.

Plain Python: the facts are passed in, so it is unit tested without a worker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from morphserve.runtime.thread_binding import deal

# The modules that take longest, longest first (seconds from a serial fresh clone on a 2-core
# AVX2 EPYC), so that the two workers end together. The first also builds both of the
# session's packs; the modules that need no pack come right after it, so that one worker runs
# them while the other builds (every engine module waits for the session pack). A module not
# named here runs after these, in name order.
LONGEST_MODULES = [
    "test_cpu_tiers_engine.py",  # 432 s, with both packs
    "test_kv_resize_e2e.py",  # 428 s
    "test_evaluate_e2e.py",  # 335 s
    "test_swap_real_twin.py",  # 142 s
    "test_policy_e2e.py",  # 130 s
    "test_soak.py",  # 111 s
    "test_failure_recovery.py",  # 97 s
    "test_tensor_parallel.py",  # 94 s
    "test_vllm_serve_cli.py",  # 84 s
    "test_http_control.py",  # 71 s
    "test_fp32_engine.py",  # 66 s
    "test_doctor.py",  # 58 s
    "test_swap_identity.py",  # 41 s
]
PACK_FIXTURES = frozenset({"pack_dir", "tiered_pack", "w4_pack_dir"})


def module_order(modules: dict[str, bool]) -> list[str]:
    """Module file names (each mapped to whether it needs a pack) in the order workers take
    them: the longest, then every one that needs no pack, then the rest of the longest, then
    the others by name."""
    first = [m for m in LONGEST_MODULES[:1] if m in modules]
    no_pack = sorted(m for m, needs in modules.items() if not needs and m not in first)
    longest = [m for m in LONGEST_MODULES[1:] if m in modules and m not in no_pack]
    rest = sorted(set(modules) - set(first) - set(no_pack) - set(longest))
    return first + no_pack + longest + rest


def cpu_share(allowed: list[int], index: int, count: int) -> list[int]:
    """Worker `index` of `count`'s CPUs, dealt as MorphServe deals CPUs to tensor-parallel
    ranks (contiguous runs; shared, in turn, where there are fewer CPUs than workers)."""
    if count <= 1 or not allowed:
        return sorted(allowed)
    return deal(allowed, count)[index]


def worker_of(env: dict) -> tuple[int, int] | None:
    """(index, count) of this pytest-xdist worker, or None outside one."""
    name, count = env.get("PYTEST_XDIST_WORKER"), env.get("PYTEST_XDIST_WORKER_COUNT")
    if not name or not count or not name.startswith("gw"):
        return None
    return int(name[2:]), int(count)


NODES_ENV = "CPU_VISIBLE_MEMORY_NODES"  # vLLM's: the NUMA nodes its CPU binding may pick from


def pin_this_worker() -> list[int] | None:
    """Pin this process (and so all it starts) to its share of the CPUs; returns the share.

    vLLM's automatic binding gives rank 0 the first NUMA node the process may allocate on
    (`Mems_allowed`, which a CPU pin does not change), and only that node's CPUs: on a
    machine with a node per core, a worker pinned to the second node's CPU would get none.
    So the worker also names its CPUs' nodes to vLLM."""
    worker = worker_of(os.environ)
    if worker is None:
        return None
    share = cpu_share(sorted(os.sched_getaffinity(0)), *worker)
    os.sched_setaffinity(0, share)
    nodes = nodes_of(share)
    if nodes and NODES_ENV not in os.environ:
        os.environ[NODES_ENV] = ",".join(map(str, sorted(nodes)))
    return share


def nodes_of(cpus: list[int], root: Path = Path("/sys/devices/system/node")) -> set[int]:
    """The NUMA nodes these CPUs sit on (empty where sysfs does not say)."""
    nodes = set()
    for node in root.glob("node[0-9]*"):
        try:
            listed = parse_cpu_list((node / "cpulist").read_text())
        except (OSError, ValueError):
            continue
        if listed & set(cpus):
            nodes.add(int(node.name[4:]))
    return nodes


def parse_cpu_list(text: str) -> set[int]:
    """Linux's CPU list format: "0-3,8,10-11"."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def build_once(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `root/name`, filled by `build` for whichever worker asks first while the
    others wait; after a failed build the next asker starts again from an empty folder."""
    from filelock import FileLock

    out, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            done.touch()
    return out


def shared_root(basetemp: Path, env: dict) -> Path:
    """The folder all of a run's workers share (each has its own basetemp under it)."""
    return basetemp.parent if worker_of(env) is not None else basetemp
