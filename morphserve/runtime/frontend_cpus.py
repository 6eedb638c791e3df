"""Keep the engine core and the API server off the cores vLLM bound its workers to.

vLLM's CPU backend binds each worker's OpenMP threads to cores (VLLM_CPU_OMP_THREADS_BIND)
and leaves its other processes free to run anywhere: the engine core, which schedules every
step and then polls for the worker's output, and the API server. Linux then now and again
runs one of them on a worker's core, which takes that core, and its caches, from the model
for a time slice. A MorphServe engine core does more between two steps than a plain one (the
controller samples the scheduler, calls the workers for heap trims and KV releases), so it
lands there more often (on a 2-vCPU Zen 4 EPYC, 10 samples against 2 over one batch). What that
costs was not shown: MorphServe held at all-W8A8 first served 0.90-0.96x static W8A8's tokens/s
under a full batch with every process free and 0.986x with the others kept off the worker's core,
but measured again with the same oneDNN kernel cache for both servers it was a tie with and
without this (docs/RESULTS.md, "The worker's core").

With `frontend_cpus: auto` (opt-in: on suite-v4-zen4g's compute row it did not lower
MorphServe's violations, so by the rule written before that run the default stays `off`),
once the workers are bound, the engine core moves itself and, when its parent is the API
server, that process too, to the CPUs it may use that no worker is bound to, where any are
left. Nothing moves when the model runs in the engine core's own process (vLLM's uni
executor), when the workers are not bound (their CPUs are all of them), or when every CPU
computes. Threads started later inherit the mask. The facts come in as arguments; `move` is
the only call that changes anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("morphserve")

MODES = ("auto", "off")
DEFAULT_MODE = "off"
SERVER_MODULES = ("morphserve.vllm.server", "vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")


def plan(allowed: set[int], worker_cpus: list[set[int]]) -> set[int] | None:
    """The CPUs for the engine core and the API server: those `allowed` here that no worker
    is bound to; None where moving would gain nothing (no worker, or none left over)."""
    if not worker_cpus or not all(worker_cpus):
        return None
    rest = set(allowed) - set().union(*worker_cpus)
    return rest or None


def is_api_server(argv: list[str]) -> bool:
    """Whether a process started with `argv` is a vLLM API server: `vllm serve`, vLLM's
    OpenAI entry point, or MorphServe's (`morphserve serve` runs it). Anything else -- a
    script or a test that built an engine -- is left where it is."""
    if any(a in SERVER_MODULES for a in argv):
        return True
    return "serve" in argv[1:3] and "vllm" in [Path(a).name for a in argv[:2]]


def process_argv(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def move(pid: int, cpus: set[int]) -> int:
    """Set every thread of process `pid` to `cpus`; the number of threads moved. A thread
    that ends meanwhile, or one not ours to move, is skipped."""
    moved = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
            moved += 1
        except OSError:
            pass
    return moved


def keep_off_workers(mode: str, workers: list[dict]) -> dict:
    """Called in the engine core once its workers are bound; `workers`: each one's `pid` and
    bound `cpus`. What was done, for the state and the log."""
    if mode == "off":
        return {"mode": mode, "cpus": None, "why": "off"}
    if not workers or any("cpus" not in w or "pid" not in w for w in workers):
        return {"mode": mode, "cpus": None, "why": "the workers did not say where they run"}
    me = os.getpid()
    if any(w["pid"] == me for w in workers):
        return {"mode": mode, "cpus": None, "why": "the model runs in the engine core's own process"}
    cpus = plan(os.sched_getaffinity(0), [set(w["cpus"]) for w in workers])
    if cpus is None:
        return {"mode": mode, "cpus": None, "why": "no CPU is free of a worker"}
    moved = {"engine_core": move(me, cpus)}
    parent = os.getppid()
    if is_api_server(process_argv(parent)):
        moved["api_server"] = move(parent, cpus)
    log.info("MorphServe: engine core%s on CPUs %s, off the workers' %s", " and API server" if "api_server" in moved else "",
             sorted(cpus), sorted(set().union(*(set(w["cpus"]) for w in workers))))
    return {"mode": mode, "cpus": sorted(cpus), "threads_moved": moved, "engine_core_pid": me}
