"""morphserve.harness.proc_stat: the /proc/PID/stat line read once, for every script."""

from __future__ import annotations

import os

from morphserve.harness import proc_stat

# proc(5)'s layout; the name holds a space and both parentheses, as a thread's may
LINE = ("4242 (VLLM::Worker (x) y) Z 1 4242 4242 0 -1 4194560 2600 0 3 0 7900 250 0 0 20 0 "
        "9 0 100 1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0")


def test_fields_are_counted_from_the_last_parenthesis():
    stat = proc_stat.parse(LINE, ticks_per_s=100)
    assert (stat.name, stat.state) == ("VLLM::Worker (x) y", "Z")
    assert (stat.user_s, stat.system_s, stat.cpu_s) == (79.0, 2.5, 81.5)
    assert (stat.minor_faults, stat.major_faults) == (2600, 3)


def test_this_process_reads_and_a_gone_one_is_none():
    me = proc_stat.read(os.getpid())
    assert me is not None and me.state in ("R", "S") and me.cpu_s > 0
    thread = proc_stat.read(os.getpid(), os.getpid())  # the main thread's own stat
    assert thread is not None and thread.name == me.name
    assert proc_stat.read(2 ** 22 + 1) is None  # above the kernel's pid_max limit: never a process
