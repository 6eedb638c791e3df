"""How `make test`'s workers share the cores, the order they take modules in, and the packs
they build once between them (tests/parallel.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.parallel import LONGEST_MODULES, build_once, cpu_share, module_order, shared_root, worker_of


@pytest.mark.parametrize("allowed, count, shares", [
    ([0, 1], 2, [[0], [1]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
    ([3, 1, 2, 0], 2, [[0, 1], [2, 3]]),
    ([0], 2, [[0], [0]]),  # fewer CPUs than workers: they share
    ([0, 1, 2], 1, [[0, 1, 2]]),
])
def test_each_worker_gets_its_own_cores_and_together_all_of_them(allowed, count, shares):
    assert [cpu_share(allowed, i, count) for i in range(count)] == shares


def test_a_worker_is_known_by_pytest_xdists_variables():
    assert worker_of({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}) == (1, 2)
    assert worker_of({}) is None
    assert worker_of({"PYTEST_XDIST_WORKER": "master"}) is None
    assert shared_root(Path("/t/pytest-3/popen-gw0"), {"PYTEST_XDIST_WORKER": "gw0",
                                                      "PYTEST_XDIST_WORKER_COUNT": "2"}) == Path("/t/pytest-3")
    assert shared_root(Path("/t/pytest-3"), {}) == Path("/t/pytest-3")


def test_the_pack_builder_comes_first_then_the_modules_without_a_pack_then_the_longest():
    modules = {"test_z_unit.py": False, "test_a_unit.py": False, LONGEST_MODULES[0]: True,
               LONGEST_MODULES[2]: True, LONGEST_MODULES[1]: True, "test_b_engine.py": True}
    assert module_order(modules) == [LONGEST_MODULES[0], "test_a_unit.py", "test_z_unit.py",
                                     LONGEST_MODULES[1], LONGEST_MODULES[2], "test_b_engine.py"]


def test_a_long_module_that_needs_no_pack_runs_with_the_others_that_need_none():
    assert module_order({LONGEST_MODULES[1]: False, LONGEST_MODULES[0]: True}) == LONGEST_MODULES[:2]


def test_a_shared_folder_is_built_once_while_the_other_asker_waits(tmp_path):
    built: list[str] = []

    def build(folder: Path) -> None:
        built.append(threading.current_thread().name)
        time.sleep(0.2)
        (folder / "pack.json").write_text("{}")

    threads = [threading.Thread(target=build_once, args=(tmp_path, "pack", build), name=f"w{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    assert (tmp_path / "pack" / "pack.json").is_file()


def test_after_a_failed_build_the_next_asker_starts_from_an_empty_folder(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("prepare failed")

    with pytest.raises(RuntimeError):
        build_once(tmp_path, "pack", fail)
    seen: list[list[str]] = []
    build_once(tmp_path, "pack", lambda folder: seen.append(sorted(p.name for p in folder.iterdir())))
    assert seen == [[]]


def test_a_workers_cpus_are_placed_on_their_numa_nodes(tmp_path):
    from tests.parallel import nodes_of, parse_cpu_list

    for node, cpus in (("node0", "0-1,4\n"), ("node1", "2-3,5\n")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus)
    assert parse_cpu_list("0-1,4\n") == {0, 1, 4} and parse_cpu_list("7") == {7}
    assert nodes_of([0], tmp_path) == {0}
    assert nodes_of([3], tmp_path) == {1}  # vLLM must be told: its auto binding would take node 0
    assert nodes_of([1, 2], tmp_path) == {0, 1}
    assert nodes_of([0], tmp_path / "nowhere") == set()
