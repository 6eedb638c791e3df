"""What the runs ran on. CPU timings and even which kernels vLLM picks depend on the ISA
(AMX CPUs get other bf16 and 4-bit paths), so every output folder records it and refuses to
mix machines."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from quant_layers.cpu_kind import UNKNOWN_CPU, parse_cpuinfo

# Before each run: how long to wait for the cores to fall idle (the last server's processes
# exiting, or work of someone else's), and the share of them in use that counts as busy (the
# kernel profile's threshold). On a 2-vCPU machine one stray process is half the machine:
# every system's timings drift with it, so a run started busy is flagged in its run.json.
IDLE_WAIT_S = 60.0
IDLE_WAIT_ENV = "MORPHSERVE_IDLE_WAIT_S"  # another wait in seconds (0: one reading, no wait)
IDLE_READING_S = 1.0


def describe(cpuinfo: str | None = None, meminfo: str | None = None) -> dict:
    cpuinfo = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    meminfo = meminfo if meminfo is not None else _read("/proc/meminfo")
    cpu = parse_cpuinfo(cpuinfo)  # the one reading of cpuinfo (the kernel profile's key reads the same)
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    return {"cpu": cpu.model if cpu.model != UNKNOWN_CPU else "unknown", "cores": os.cpu_count() or 0,
            "amx": cpu.amx, "avx512": cpu.avx512, "mem_gib": round(mem_kb / 2**20),
            # the microarchitecture the name hides (a Zen 4 and a Zen 5 are both "AMD EPYC")
            "family": cpu.family, "model_number": cpu.model_number}


def label(m: dict) -> str:
    isa = "AMX" if m.get("amx") else ("AVX-512, no AMX" if m.get("avx512") else "no AVX-512")
    generation = f", family {m['family']} model {m.get('model_number', '')}" if m.get("family") else ""
    return f"{m.get('cores')} vCPUs {m.get('cpu')} ({isa}{generation}), {m.get('mem_gib')} GiB"


def same_machine(previous: dict, here: dict) -> bool:
    """Whether runs recorded on `previous` may be mixed with runs here: the same name and AMX,
    and the same family and model where both records have them (folders written before
    they were recorded have not)."""
    if (previous.get("cpu"), previous.get("amx")) != (here.get("cpu"), here.get("amx")):
        return False
    keys = ("family", "model_number")
    return not (all(previous.get(k) for k in keys) and all(here.get(k) for k in keys)) or all(
        previous[k] == here[k] for k in keys)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def idle_wait_s(env: dict | None = None) -> float:
    raw = (os.environ if env is None else env).get(IDLE_WAIT_ENV)
    try:
        return max(0.0, float(raw)) if raw is not None else IDLE_WAIT_S
    except ValueError:
        return IDLE_WAIT_S


def wait_until_idle(busy: Callable[[float], float] | None = None, cores: int | None = None,
                    wait_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Waits up to `wait_s` for fewer than BUSY_LOAD of the cores to be in use, and says what
    it found: {"load": cores in use at the last reading, "cores", "waited_s", "busy": still
    over after the wait}. `busy(interval_s)` reads the load over an interval (default: /proc/stat)."""
    from morphserve.runtime.tier_speed import BUSY_LOAD, busy_cores

    busy = busy or (lambda interval: busy_cores(interval))
    cores = cores or len(os.sched_getaffinity(0))
    wait_s = idle_wait_s() if wait_s is None else wait_s
    start = clock()
    load = busy(IDLE_READING_S)
    while load >= BUSY_LOAD * cores and clock() - start < wait_s:
        load = busy(IDLE_READING_S)
    return {"load": round(load, 2), "cores": cores, "waited_s": round(clock() - start, 1),
            "busy": load >= BUSY_LOAD * cores}
