"""One reading of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) for every script and
harness that measures a server's processes: CPU seconds in user and kernel mode, page
faults and the run state. One parser because the line has a trap: the process name sits in
parentheses and may itself hold spaces and parentheses, so fields are counted from the last
")" (proc(5)). psutil would do this too, but it is not a dependency of the product."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    name: str
    state: str  # R, S, D, Z (zombie), X (dead), ...
    user_s: float
    system_s: float  # kernel time: where page faults, madvise and munmap land
    minor_faults: int
    major_faults: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


def parse(text: str, ticks_per_s: float = TICKS_PER_S) -> ProcStat:
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    return ProcStat(name=head[head.index("(") + 1:], state=fields[0],
                    user_s=int(fields[11]) / ticks_per_s, system_s=int(fields[12]) / ticks_per_s,
                    minor_faults=int(fields[7]), major_faults=int(fields[9]))


def read(pid: int, tid: int | None = None) -> ProcStat | None:
    """The process's (or one of its threads') counters now; None once it is gone."""
    path = Path(f"/proc/{pid}/stat") if tid is None else Path(f"/proc/{pid}/task/{tid}/stat")
    try:
        return parse(path.read_text())
    except OSError:  # gone (FileNotFoundError, ProcessLookupError) or unreadable
        return None
