"""The engine core and the API server kept off the workers' cores (morphserve.runtime.frontend_cpus):
the plan, which parent counts as an API server, and a real move of every thread of a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from morphserve.runtime import frontend_cpus as fc


def test_the_plan_is_the_allowed_cpus_no_worker_is_bound_to():
    assert fc.plan({0, 1}, [{0}]) == {1}
    assert fc.plan({0, 1, 2, 3}, [{0}, {1}]) == {2, 3}  # two ranks
    assert fc.plan({0, 1}, [{0, 1}]) is None  # an unbound worker runs everywhere: nothing to leave it
    assert fc.plan({0, 1}, [{0}, {1}]) is None  # every CPU computes
    assert fc.plan({0, 1}, []) is None and fc.plan({0, 1}, [set()]) is None


@pytest.mark.parametrize("argv, server", [
    ([sys.executable, "-m", "morphserve.vllm.server", "--model", "m"], True),
    ([sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", "m"], True),
    (["/venv/bin/vllm", "serve", "m", "--additional-config", "{}"], True),
    ([sys.executable, "/venv/bin/vllm", "serve", "m"], True),
    ([sys.executable, "-m", "pytest", "tests/test_x.py"], False),  # a test that built an engine
    ([sys.executable, "bench.py", "--serve"], False),
    ([], False),
])
def test_only_a_vllm_api_server_parent_is_moved(argv, server):
    assert fc.is_api_server(argv) is server


def test_off_and_the_uni_executor_move_nothing():
    me = os.getpid()
    assert fc.keep_off_workers("off", [{"pid": me + 1, "cpus": [0]}])["cpus"] is None
    assert "own process" in fc.keep_off_workers("auto", [{"pid": me, "cpus": [0]}])["why"]
    assert "did not say" in fc.keep_off_workers("auto", [{"layers": 3}])["why"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to move a process between")
def test_move_sets_every_thread_of_a_running_process():
    """A child with three threads, spread over every CPU and then moved to one: every thread's
    mask follows (the moves are the kernel's, not this test process's own pinning)."""
    code = "import threading, time\n[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(2)]\n" \
           "print('up', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    every, last = set(range(os.cpu_count())), os.cpu_count() - 1
    try:
        assert child.stdout.readline().strip() == "up"
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) == 3
        for cpus in (every, {last}):
            assert fc.move(child.pid, cpus) == 3
            assert all(os.sched_getaffinity(int(t)) == cpus for t in tids)
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    assert fc.move(child.pid, {0}) == 0  # gone: nothing moved, nothing raised
