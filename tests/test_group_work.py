"""Each server process's work over a replay (morphserve.harness.servers.group_work and
work_between): the difference of two readings, per process title, on a real process group."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from morphserve.harness.servers import group_work, stop_server, work_between


def test_work_between_takes_each_titles_difference_and_its_cpu_total():
    before = {"VLLM::Worker": {"user_s": 1.0, "system_s": 0.5, "minor_faults": 100},
              "python": {"user_s": 2.0, "system_s": 0.1, "minor_faults": 10}}
    after = {"VLLM::Worker": {"user_s": 3.5, "system_s": 1.0, "minor_faults": 700},
             "VLLM::EngineCor": {"user_s": 9.0, "system_s": 0.0, "minor_faults": 1}}  # not there before
    assert work_between(before, after) == {
        "VLLM::Worker": {"user_s": 2.5, "system_s": 0.5, "minor_faults": 600, "cpu_s": 3.0}}


def test_a_busy_process_in_the_group_shows_its_cpu_and_faults():
    # 0.6 s of the child's own CPU time, not of the wall clock: a shared VM's steal cannot shorten it
    code = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6:\n    bytearray(1 << 20)\n"
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], process_group=0)
    try:
        before = group_work(proc.pid)
        deadline = time.monotonic() + 15  # a loaded machine starts Python slowly
        while True:
            done = work_between(before, group_work(proc.pid))
            if time.monotonic() > deadline or sum(w["cpu_s"] for w in done.values()) > 0.3:
                break
            time.sleep(0.2)
    finally:
        stop_server(proc)
    (name, work), = done.items()
    assert name.startswith("python")
    assert work["cpu_s"] > 0.3 and work["minor_faults"] > 0
    assert os.getpgid(os.getpid()) != proc.pid  # the reading was of the child's group only
