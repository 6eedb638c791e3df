"""Where glibc puts a server's large buffers: in its heap (its own choice) or in mappings of their own.

A prompt-sized step allocates megabytes per linear (the int8 path three buffers: the
quantized input, its scales and the output) and frees them within the step. glibc's default
raises its mmap threshold to the size of the largest block it has freed (up to 32 MiB), so
after the first prompt every such buffer comes from the heap, and the heap keeps the freed
space, fragmented, until a trim (morphserve.runtime.heap_trimmer) hands it back. On a
prompt-heavy window that free space is what put a MorphServe worker above plain vLLM's: on
a Zen 5 EPYC at 450 MB its heap grew by about 230 MiB between its rest and its peak, plain
vLLM's by 9 (development reading, docs/RESULTS.md, "Large buffers in their own mappings").

`mapped` fixes glibc's threshold at `THRESHOLD_BYTES` (a fixed threshold also stops the
dynamic raise), so every buffer of that size or more gets a mapping of its own and goes
back to the OS the moment it is freed, and advises those mappings huge (glibc.malloc.hugetlb=1):
without 2 MiB pages each 4 KiB page of a fresh buffer faults on first touch, and one
development run so had 3.6 million page faults in the worker against 0.3 million, and 12
SLO violations against 1. So `mapped` needs the kernel's transparent huge pages (madvise
or always) and is refused without them. Both are glibc tunables, read once as a process
starts, so they are set in the environment the server's processes start with (as the
oneDNN kernel cache and huge pages are); an operator's own value of either always wins.
A server run as `vllm serve` with the plugin gets them only from its operator.

It is not the default because the freed memory comes back as fresh pages: measured there,
served on that window, `mapped` took MorphServe's peak RSS from 2914 to 2826 MiB (plain
bf16: 2910) at the same violations, but its first tokens came 1.93x later at the 95th
percentile and its worker spent 1.027x the CPU, for plain vLLM alike: the kernel zero-fills
every page of a new mapping, where the heap hands back chunks already touched.
"""

from __future__ import annotations

from typing import MutableMapping

from morphserve.errors import MorphServeError
from morphserve.runtime import huge_pages

MODES = ("heap", "mapped")
DEFAULT_MODE = "heap"  # glibc's own behaviour: `mapped` lost its development reading on CPU and first tokens
THRESHOLD_BYTES = 4 * 2**20  # two huge pages: decode-sized buffers (under 1 MiB here) stay in the heap
THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold"


def apply(env: MutableMapping[str, str], mode: str, kernel: str | None = huge_pages.READ) -> MutableMapping[str, str]:
    """`env` with glibc's tunables for `mode`; other tunables in GLIBC_TUNABLES are kept."""
    if mode not in MODES:
        raise ValueError(f"large buffers: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "heap":
        return env
    thp = huge_pages.kernel_mode() if kernel == huge_pages.READ else kernel
    if not huge_pages.usable(thp):
        raise MorphServeError(f"--large-buffers mapped needs the kernel's transparent huge pages (its mode is "
                              f"{thp or 'unknown'}, not madvise or always): without them every page of a mapped "
                              f"buffer faults on first touch; use --large-buffers heap")
    return huge_pages.add_tunables(env, {THRESHOLD_TUNABLE: THRESHOLD_BYTES, huge_pages.GLIBC_TUNABLE: 1})


def describe(env: MutableMapping[str, str]) -> str:
    """One line for the server's start-up output."""
    tunables = env.get(huge_pages.TUNABLES_ENV, "")
    if THRESHOLD_TUNABLE not in tunables:
        return "large buffers: in glibc's heap (its own mmap threshold)"
    return f"large buffers: in mappings of their own ({huge_pages.TUNABLES_ENV}={tunables})"
