"""Where a running server's CPU time goes, per process and thread.

Waits for a server whose command line contains `--match` (for instance
`morphserve.vllm.server` or `api_server.entry`, the evaluation's plain vLLM), lets it start
for `--settle` seconds, then reads every thread's CPU time (utime + stime, /proc) in its
process group (the harness starts each server as one) twice, `--seconds` apart, and prints the busiest threads. It answers questions
like "does vLLM's engine-core process spin while the worker computes?" on a machine with few
cores, where such a spin takes a core from everything else.

    python scripts/server_thread_cpu.py --match morphserve.vllm.server [--settle 75] [--seconds 50]
    python scripts/server_thread_cpu.py --match morphserve.vllm.server --seconds 0 --repeat 6

`--seconds 0` reads until the server exits (its last reading, every 2 s), so a whole replay
is counted; `--repeat` then waits for the next server, as an evaluation starts one per run.

psutil would do the reading, but it is not a dependency; /proc is a few lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.harness import proc_stat  # noqa: E402
from morphserve.harness.servers import group_pids, running  # noqa: E402  (a server and its engine are one process group)


def matching(pattern: str) -> list[int]:
    """Processes whose command line contains `pattern`, this one and any reader like it
    excepted (a shell that started this one has the pattern in its command line too)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pattern in cmd and "server_thread_cpu" not in cmd:
            out.append(int(entry))
    return sorted(out)


def running_any(pids: list[int]) -> bool:
    return any(running(pid) for pid in pids)


def thread_seconds(pid: int) -> dict[tuple[int, int, str], float]:
    """(pid, tid, thread name) -> CPU seconds so far."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = proc_stat.read(pid, int(tid))
        if stat is not None:
            out[(pid, int(tid), stat.name)] = stat.cpu_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", required=True, help="a substring of the server's command line")
    ap.add_argument("--settle", type=float, default=75.0, help="seconds after the server appears before reading "
                                                                 "(start-up and warm-up; default 75)")
    ap.add_argument("--seconds", type=float, default=50.0,
                    help="seconds between the two readings (default 50; 0: until the server exits)")
    ap.add_argument("--repeat", type=int, default=1, help="servers to read one after another (default 1)")
    ap.add_argument("--after-file", default=None, metavar="GLOB",
                    help="instead of --settle, start reading when a file matching GLOB appears after the server "
                         "does (an evaluation's run folder gets replay.log when its replay starts: "
                         "'evaluations/results/NAME/*/*/*/rep*/replay.log')")
    ap.add_argument("--top", type=int, default=8, help="threads printed (default 8)")
    ap.add_argument("--wait", type=float, default=3600.0, help="give up if no server appears within this (default 3600)")
    args = ap.parse_args(argv)
    for _ in range(args.repeat):
        code = read_one(args)
        if code:
            return code
    return 0


def read_one(args) -> int:
    deadline = time.monotonic() + args.wait
    while True:
        found = matching(args.match)
        if not found:
            if time.monotonic() > deadline:
                print(f"error: no process matching {args.match!r} appeared within {args.wait:g} s", file=sys.stderr)
                return 2
            time.sleep(2)
            continue
        if not args.after_file:
            time.sleep(args.settle)
            break
        appeared = time.time()
        while running_any(found) and not any(p.stat().st_mtime >= appeared for p in Path().glob(args.after_file)):
            time.sleep(1)
        if running_any(found):
            break  # else that server ended before its replay: wait for the next one
    pids = group_pids(os.getpgid(found[0]))
    before = {k: v for pid in pids for k, v in thread_seconds(pid).items()}
    t0 = time.monotonic()
    if args.seconds > 0:
        time.sleep(args.seconds)
        after = {k: v for pid in pids for k, v in thread_seconds(pid).items()}
        wall = time.monotonic() - t0
    else:  # until the server is gone: the last complete reading counts
        after, wall = before, 0.0
        while running_any(pids):
            reading = {k: v for pid in pids for k, v in thread_seconds(pid).items()}
            if reading and all(running_any([pid]) for pid in pids):
                after, wall = reading, time.monotonic() - t0
            time.sleep(2)
    rows = sorted(((v - before.get(k, 0.0), k) for k, v in after.items()), reverse=True)[: args.top]
    print(f"CPU seconds per thread over {wall:.0f} s of wall time (server pid {found[0]}, {len(pids)} processes "
          f"in its group; all threads {sum(v - before.get(k, 0.0) for k, v in after.items()):.1f} s)", flush=True)
    for seconds, (pid, tid, name) in rows:
        print(f"{seconds:7.2f} s  ({seconds / wall:4.0%} of a core)  pid {pid} tid {tid} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
