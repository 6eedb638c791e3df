"""CPU time that work outside the evaluation took from the machine while a run replayed.

`machine.wait_until_idle` checks the cores before a run starts; work that starts during the
replay went unseen. On a 2-CPU machine that decides a row: a calibration run of plain bf16
read 21 violations of 55 while a 2-minute unit test ran beside it, and 2 alone. So each run
also records what the machine's cores did during its replay beyond the evaluation's own
process tree (this process, its waited-for children such as the load generator, and every
live descendant: the server's processes): `/proc/stat`'s busy time minus that tree's CPU
time, per second of wall time. Measured on a 2-vCPU EPYC while a run replayed, the two agree
within 0.07 CPU seconds over 30 s (kernel work charged to no process), so a few hundredths of
a core is the floor. Plain reads of /proc, no psutil: the three figures needed are one line
of /proc/stat and fields 14-17 of each /proc/PID/stat.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# Other work's average over the replay, in cores, from which a run is flagged: a tenth of a
# core is several times the floor above and a fifth of what one stray busy process takes
# from half of a replay.
BUSY_DURING_CORES = 0.1

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuReading:
    wall_s: float
    machine_busy_s: float  # every core's busy time since boot
    tree_s: float  # the evaluation's own process tree's CPU time


def machine_busy_s(stat_line: str) -> float:
    """Busy seconds from /proc/stat's "cpu" line: user, nice, system, irq and softirq
    (idle, iowait and steal are not this machine's work; guest time is inside user)."""
    fields = [int(x) for x in stat_line.split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / _HZ


def parse_proc_stat(text: str) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and its waited-for children) from one
    /proc/PID/stat; the command name may hold spaces and parentheses, so fields are counted
    from its last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, (utime + stime + cutime + cstime) / _HZ


def tree_cpu_s(root: int, processes: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of `root` and every live descendant, from {pid: (ppid, seconds)}. A
    process's own figure includes children it has waited for, so none is counted twice."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in processes:
            total += processes[pid][1]
        todo.extend(children.get(pid, []))
    return total


def _processes(proc: Path) -> dict[int, tuple[int, float]]:
    out = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = parse_proc_stat((entry / "stat").read_text())
            except (OSError, ValueError, IndexError):
                pass  # exited while read
    return out


def read(root: int | None = None, proc: Path = Path("/proc")) -> CpuReading | None:
    """Now, for the tree under `root` (default: this process); None where /proc is not Linux's."""
    try:
        line = (proc / "stat").read_text().splitlines()[0]
        processes = _processes(proc)
    except (OSError, IndexError):
        return None
    return CpuReading(time.monotonic(), machine_busy_s(line), tree_cpu_s(os.getpid() if root is None else root,
                                                                         processes))


def others_during(before: CpuReading | None, after: CpuReading | None) -> dict | None:
    """{"others_cores": average cores other work used between the readings, "busy": over
    BUSY_DURING_CORES}, or None without both readings."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    others = (after.machine_busy_s - before.machine_busy_s) - (after.tree_s - before.tree_s)
    cores = max(0.0, others) / (after.wall_s - before.wall_s)
    return {"others_cores": round(cores, 3), "seconds": round(after.wall_s - before.wall_s, 1),
            "busy": cores >= BUSY_DURING_CORES}
