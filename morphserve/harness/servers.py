"""Start, watch and reap vLLM processes for tests, benchmarks and evaluations.

A vLLM server is several processes (API server, engine core, workers), so each is started
in a process group of its own: the group id names all of them, memory is summed over the
group, and the whole group is killed at the end (engine processes can outlive their parent).
The group stays in the caller's session, so the server and the load generator share one
scheduling group (Linux autogroup gives each session its own): with a session of its own,
a server that kept both cores of a 2-vCPU machine busy starved the load generator for up
to 3 s at a time, and the load generator's stalls were read as the server's latency
(docs/RESULTS.md, "The light row's stall").
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, NamedTuple

from morphserve.harness import proc_stat
from morphserve.runtime import onednn_cache
from morphserve.runtime.allocator import default_allocator, preload_env
from morphserve.runtime.proc_memory import process_rss

REPO = Path(__file__).resolve().parents[2]


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message has the log's tail."""


_LOWEST_PORT = 20000
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on every interface now, for a server about to start (vLLM binds 0.0.0.0
    some seconds later). Drawn at random below the kernel's ephemeral range, not from it: a
    port the OS picked (bind to port 0) is one it hands out again to the next socket that asks,
    and with two test workers, each starting servers whose engines open sockets of their own,
    a server once found its port taken in that gap ("Address already in use"). Below the
    range only another caller of this function picks ports; two draws from about 12,000 meet
    rarely, and never in one process (each port is handed out once)."""
    rng = random.SystemRandom()
    top = _ephemeral_low() - 1
    if top < _LOWEST_PORT + 1000:  # an unusual kernel setting: let the OS pick, as before
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = rng.randint(_LOWEST_PORT, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port found between {_LOWEST_PORT} and {top}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def start_server(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 300,
                 cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` in a process group of its own (in `cwd`, default: the checkout when there is one);
    return once /health answers, or reap the whole group and raise with the log's tail
    (engine processes of a server that died in start-up can outlive it)."""
    proc = _spawn(cmd, env, log, cwd)
    try:
        _wait_for_health(proc, log, port, timeout)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def _wait_for_health(proc: subprocess.Popen, log: Path, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited (log {log}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise ServerStartError(f"server did not answer /health within {timeout:.0f} s (log {log})")


class Server(NamedTuple):
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT


@contextlib.contextmanager
def serving(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 300,
            cwd: Path | None = None) -> Iterator[Server]:
    """`start_server` as a context: yields once /health answers and reaps the whole group
    on the way out, however the block ends."""
    proc = start_server(cmd, env, log, port, timeout, cwd)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}")
    finally:
        stop_server(proc)


def run_in_group(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None,
                 cwd: Path | None = None) -> int:
    """Run `cmd` to its end in a process group of its own, output to `log`; return its exit status.
    The group is reaped afterwards: vLLM's engine-core and worker processes can outlive
    their parent, and as output goes to a file, not a pipe, such orphans cannot keep us
    waiting for EOF."""
    proc = _spawn(cmd, env, log, cwd)
    try:
        return proc.wait(timeout=timeout)
    finally:
        stop_server(proc)


def _spawn(cmd: list[str], env: dict | None, log: Path, cwd: Path | None) -> subprocess.Popen:
    """`cmd` in a process group of its own, output to `log`, in `cwd` (default:
    the checkout when there is one, so `-m morphserve...` imports it), with the malloc
    `MORPHSERVE_ALLOCATOR` names preloaded (default: glibc's, nothing preloaded) and oneDNN's
    kernel cache bounded (`morphserve.runtime.onednn_cache`), whichever server it is."""
    if cwd is None and (REPO / "pyproject.toml").exists():
        cwd = REPO
    env = dict(os.environ if env is None else env)
    env = preload_env(default_allocator(env), env)  # the same malloc for every side of a comparison
    onednn_cache.bounded(env)  # and the same oneDNN kernel cache
    with open(log, "w") as f:
        # not start_new_session: why, in the module docstring (one scheduling group)
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, process_group=0)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGKILL the process's whole group (it was started in a group of its own) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def running(pid: int) -> bool:
    """Not exited: a killed orphan may stay a zombie until its new parent reaps it."""
    stat = proc_stat.read(pid)
    return stat is not None and stat.state not in ("Z", "X")


def group_survivors(pgid: int, within: float = 10.0) -> list[int]:
    """The group's processes still running `within` seconds after it was killed (polled).

    SIGKILL is delivered asynchronously, and a process that held a GiB or more takes a while
    to give it back on a busy machine: the soak once found its engine alive 2 s after the
    kill. Only a process still running after the wait is a leak."""
    deadline = time.monotonic() + within
    while True:
        alive = [pid for pid in group_pids(pgid) if running(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


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


def group_work(pgid: int) -> dict[str, dict]:
    """CPU seconds (user, kernel) and minor page faults of every live process of the group,
    summed per process title (vLLM's APIServer, EngineCore, Worker): read before and after a
    replay, the difference says which process did more work for the same requests, and how
    much of it was the kernel's (page faults land there)."""
    out: dict[str, dict] = {}
    for pid in group_pids(pgid):
        stat = proc_stat.read(pid)
        if stat is None:
            continue
        seen = out.setdefault(stat.name, {"user_s": 0.0, "system_s": 0.0, "minor_faults": 0})
        seen["user_s"] += stat.user_s
        seen["system_s"] += stat.system_s
        seen["minor_faults"] += stat.minor_faults
    return out


def work_between(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Each process title's work from `before` to `after` (titles present in both), with its
    CPU seconds in all."""
    out = {}
    for name in before.keys() & after.keys():
        delta = {k: after[name][k] - before[name][k] for k in before[name]}
        delta["cpu_s"] = delta["user_s"] + delta["system_s"]
        out[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in delta.items()}
    return dict(sorted(out.items()))


def group_rss(pgid: int) -> dict:
    """RssAnon and RssFile (bytes) summed over every live process of the group, and per
    process name (vLLM titles its processes: APIServer, EngineCore, Worker), which is what
    says where a difference between two servers sits."""
    total: dict = {"rss_anon_bytes": 0, "rss_file_bytes": 0, "processes": 0, "by_process": {}, "pids": {}}
    for pid in group_pids(pgid):
        try:
            rss = process_rss(pid)
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total["rss_anon_bytes"] += rss["rss_anon_bytes"]
        total["rss_file_bytes"] += rss["rss_file_bytes"]
        total["processes"] += 1
        total["pids"][pid] = name
        anon, file = total["by_process"].get(name, (0, 0))
        total["by_process"][name] = (anon + rss["rss_anon_bytes"], file + rss["rss_file_bytes"])
    return total
