"""What the runs ran on. CPU timings and even which kernels vLLM picks depend on the ISA
(AMX CPUs get other bf16 and 4-bit paths), so every output folder records it and refuses to
mix machines."""

from __future__ import annotations

import os
from pathlib import Path


def describe(cpuinfo: str | None = None, meminfo: str | None = None) -> dict:
    cpuinfo = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    meminfo = meminfo if meminfo is not None else _read("/proc/meminfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    return {"cpu": fields.get("model name", "unknown"), "cores": os.cpu_count() or 0,
            "amx": "amx_tile" in flags, "avx512": "avx512f" in flags, "mem_gib": round(mem_kb / 2**20)}


def label(m: dict) -> str:
    isa = "AMX" if m.get("amx") else ("AVX-512, no AMX" if m.get("avx512") else "no AVX-512")
    return f"{m.get('cores')} vCPUs {m.get('cpu')} ({isa}), {m.get('mem_gib')} GiB"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
