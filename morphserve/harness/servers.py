"""Start, watch and reap vLLM server processes for benchmarks and evaluations.

A vLLM server is several processes (API server, engine core, workers), so each is started
in its own session: the group id names all of them, memory is summed over the group, and
the whole group is killed at the end (engine processes can outlive their parent).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from morphserve.runtime.proc_memory import process_rss

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 300,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (in `cwd`, default: the checkout when there is one);
    return once /health answers, or raise with the log's tail."""
    if cwd is None and (REPO / "pyproject.toml").exists():
        cwd = REPO
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited (log {log}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"server did not answer /health within {timeout:.0f} s (log {log})")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def group_rss(pgid: int) -> dict[str, int]:
    """RssAnon and RssFile (bytes) summed over every live process of the group."""
    total = {"rss_anon_bytes": 0, "rss_file_bytes": 0, "processes": 0}
    for pid in group_pids(pgid):
        try:
            rss = process_rss(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        total["rss_anon_bytes"] += rss["rss_anon_bytes"]
        total["rss_file_bytes"] += rss["rss_file_bytes"]
        total["processes"] += 1
    return total
