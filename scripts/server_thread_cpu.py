"""Where a running server's CPU time goes, per process and thread.

Waits for a server whose command line contains `--match` (for instance
`morphserve.vllm.server` or `api_server.entry`, the evaluation's plain vLLM), lets it start
for `--settle` seconds, then reads every thread's CPU time (utime + stime, /proc) in its
process tree twice, `--seconds` apart, and prints the busiest threads. It answers questions
like "does vLLM's engine-core process spin while the worker computes?" on a machine with few
cores, where such a spin takes a core from everything else.

    python scripts/server_thread_cpu.py --match morphserve.vllm.server [--settle 75] [--seconds 50]

psutil would do the reading, but it is not a dependency; /proc is a few lines.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def processes() -> list[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else ""))
    return rows


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in processes():
        children.setdefault(ppid, []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


def thread_seconds(pid: int) -> dict[tuple[int, int, str], float]:
    """(pid, tid, thread name) -> CPU seconds so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[(pid, int(tid), name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", required=True, help="a substring of the server's command line")
    ap.add_argument("--settle", type=float, default=75.0, help="seconds after the server appears before reading "
                                                                 "(start-up and warm-up; default 75)")
    ap.add_argument("--seconds", type=float, default=50.0, help="seconds between the two readings (default 50)")
    ap.add_argument("--top", type=int, default=8, help="threads printed (default 8)")
    ap.add_argument("--wait", type=float, default=3600.0, help="give up if no server appears within this (default 3600)")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.wait
    me = os.getpid()
    while True:
        found = [pid for pid, _, cmd in processes() if args.match in cmd and pid != me and "server_thread_cpu" not in cmd]
        if found:
            break
        if time.monotonic() > deadline:
            print(f"error: no process matching {args.match!r} appeared within {args.wait:g} s", file=sys.stderr)
            return 2
        time.sleep(2)
    time.sleep(args.settle)
    pids = tree(found[0])
    before = {k: v for pid in pids for k, v in thread_seconds(pid).items()}
    t0 = time.monotonic()
    time.sleep(args.seconds)
    after = {k: v for pid in pids for k, v in thread_seconds(pid).items()}
    wall = time.monotonic() - t0
    rows = sorted(((v - before.get(k, 0.0), k) for k, v in after.items()), reverse=True)[: args.top]
    print(f"CPU seconds per thread over {wall:.0f} s of wall time (server pid {found[0]}, {len(pids)} processes)")
    for seconds, (pid, tid, name) in rows:
        print(f"{seconds:7.2f} s  ({seconds / wall:4.0%} of a core)  pid {pid} tid {tid} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
