"""What kind of x86 CPU this is, read from /proc/cpuinfo's flags.

The kind decides two things MorphServe cannot assume: which of vLLM's CPU builds runs
(`_C` for AVX-512 with bf16, `_C_AVX512`, or `_C_AVX2`, whose kernels differ: the AVX2
build has no W4A16 GEMM), and whether bf16 arithmetic is native (AVX512_BF16 or AMX) or
emulated by torch at about a tenth of fp32's speed. Its last-level cache size decides how
many weights a kernel timing must stream to look like a whole model's decode step.
Plain Python: every room may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuKind:
    model: str
    flags: frozenset[str]
    # /proc/cpuinfo's "cpu family" and "model" numbers: the microarchitecture, which the name
    # often hides (a Zen 4 and a Zen 5 both read "AMD EPYC" with the same deciding flags, yet
    # time the same kernels differently); "" where cpuinfo does not say.
    family: str = ""
    model_number: str = ""

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware (AVX512_BF16 or AMX-BF16); otherwise torch emulates them."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def isa(self) -> str:
        """The short name every result carries: AMX, AVX-512 or AVX2."""
        if self.amx:
            return "AMX"
        if self.avx512:
            return "AVX-512" + ("+BF16" if self.native_bf16 else "")
        return "AVX2" if "avx2" in self.flags else "x86 (no AVX2)"

    @property
    def generation(self) -> str:
        """"family 26 model 2", or "" where unknown."""
        return f"family {self.family} model {self.model_number}" if self.family else ""

    def describe(self) -> str:
        return f"{self.model} ({self.isa}{', ' + self.generation if self.generation else ''})"


UNKNOWN_CPU = "unknown CPU"  # the name where cpuinfo gives none


def parse_cpuinfo(text: str) -> CpuKind:
    model, flags = UNKNOWN_CPU, frozenset()
    numbers: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == UNKNOWN_CPU:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key in ("cpu family", "model") and key not in numbers:
            numbers[key] = value.strip()
    return CpuKind(model, flags, numbers.get("cpu family", ""), numbers.get("model", ""))


def this_cpu() -> CpuKind:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuKind(UNKNOWN_CPU, frozenset())


DEFAULT_LLC_BYTES = 32 * 2**20  # when sysfs says nothing (some containers): a server CPU's L3 slice


def parse_cache_size(text: str) -> int | None:
    """sysfs's cache size ("32768K", "1M", "512") in bytes; None if unreadable."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale if digits.isdigit() else None


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest cache CPU 0 sees (its last level). Kernel timings must stream more weights
    than this, or they measure cache-resident speed that no decode step of a whole model gets."""
    sizes = []
    for index in sorted(root.glob("index*")):
        try:
            size = parse_cache_size((index / "size").read_text())
        except OSError:
            continue
        if size:
            sizes.append(size)
    return max(sizes, default=DEFAULT_LLC_BYTES)
