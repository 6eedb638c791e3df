"""Transparent huge pages for the server's own memory: its tensors and its heap.

A CPU server's large buffers (a prompt's activations, megabytes per linear and step) are
fresh memory at almost every step: glibc hands out big blocks from new mappings or from a
heap a trim has just returned, and each 4 KiB page of them faults in on first touch. With 2
MiB pages a buffer faults 512 times less often and the kernels read it through fewer TLB
entries. Linux offers that per mapping (`madvise(MADV_HUGEPAGE)`) where
`/sys/kernel/mm/transparent_hugepage/enabled` reads `madvise` or `always`; neither torch nor
glibc asks for it by default. Both have a switch, read once as a process starts, so they are
set in the environment the server's processes start with (as the oneDNN kernel cache is):

- `THP_MEM_ALLOC_ENABLE=1`: torch's CPU allocator aligns tensors of 2 MiB or more to 2 MiB
  and advises them huge;
- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: glibc advises its own mappings and heap huge
  (glibc 2.35 and later; earlier ones ignore a tunable they do not know), which also covers
  memory oneDNN allocates itself (its packed weights and scratchpads).

Measured on a Zen 4 EPYC (`docs/RESULTS.md`, "Huge pages"): in one engine, plain vLLM's
prompt steps about 9% faster with both, MorphServe's about 1% (ranges overlapping); served on
a saturated compute row, a third fewer page faults in MorphServe's worker and no more peak
RSS, but no less CPU per token (and 125 MiB less peak RSS for plain vLLM). `auto` (the default)
asks only where the kernel can give them; `off` leaves the environment as it is; an
operator's own `THP_MEM_ALLOC_ENABLE` or `glibc.malloc.hugetlb` always wins. Under `vllm
serve` with the plugin they must be set by the operator: a process reads both as it starts,
before any plugin runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import MutableMapping

MODES = ("auto", "off")
DEFAULT_MODE = "auto"  # since suite-v4-zen4j met the rule written down before it ran
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")
TORCH_ENV = "THP_MEM_ALLOC_ENABLE"
TUNABLES_ENV = "GLIBC_TUNABLES"
GLIBC_TUNABLE = "glibc.malloc.hugetlb"
READ = "read"  # `kernel` arguments: read the kernel's mode from sysfs now


def kernel_mode(sysfs: Path = THP_SYSFS) -> str | None:
    """The kernel's THP mode (the bracketed word: always, madvise or never); None where the
    file is missing or unreadable (not Linux, THP compiled out)."""
    try:
        text = sysfs.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def usable(mode: str | None) -> bool:
    """Whether an advice for huge pages can take effect under this kernel mode."""
    return mode in ("always", "madvise")


def apply(env: MutableMapping[str, str], mode: str, kernel: str | None = READ) -> MutableMapping[str, str]:
    """`env` with huge pages asked for, where `mode` is auto and the kernel can give them.
    An existing GLIBC_TUNABLES keeps its other tunables (they are colon-separated), and one
    that names glibc.malloc.hugetlb is left as it is."""
    if mode not in MODES:
        raise ValueError(f"huge pages: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off" or not usable(kernel_mode() if kernel == READ else kernel):
        return env
    env.setdefault(TORCH_ENV, "1")
    return add_tunables(env, {GLIBC_TUNABLE: 1})


def add_tunables(env: MutableMapping[str, str], wanted: dict[str, int]) -> MutableMapping[str, str]:
    """`env` with each glibc tunable of `wanted` appended to GLIBC_TUNABLES (colon-separated),
    unless it is named there already: an operator's own value wins, other tunables stay."""
    tunables = [t for t in env.get(TUNABLES_ENV, "").split(":") if t]
    named = {t.split("=")[0] for t in tunables}
    tunables += [f"{name}={value}" for name, value in wanted.items() if name not in named]
    if tunables:
        env[TUNABLES_ENV] = ":".join(tunables)
    return env


def describe(env: MutableMapping[str, str], kernel: str | None = READ) -> str:
    """One line for the server's start-up output: what its processes will run with."""
    kernel = kernel_mode() if kernel == READ else kernel
    asked = env.get(TORCH_ENV) == "1" or f"{GLIBC_TUNABLE}=1" in env.get(TUNABLES_ENV, "")
    if not asked:
        return f"huge pages: off (kernel THP mode: {kernel or 'unknown'})"
    if not usable(kernel):
        return f"huge pages: asked for, but the kernel's THP mode is {kernel or 'unknown'}, so none are given"
    return (f"huge pages: on for tensors of 2 MiB and more and glibc's heap ({TORCH_ENV}={env.get(TORCH_ENV, '-')}, "
            f"{TUNABLES_ENV}={env.get(TUNABLES_ENV, '-')}; kernel THP mode: {kernel})")
