"""Which malloc the server's processes run with.

vLLM's CPU docs recommend preloading tcmalloc; vLLM 0.32 does it itself only for a copy
shipped in `vllm/libs`, and the CPU wheel ships none. So, when asked (`--allocator`,
`MORPHSERVE_ALLOCATOR`), the system's copy (Debian: libtcmalloc-minimal4, libjemalloc2) is
found here and put in front of `LD_PRELOAD` for the server's processes. `LD_PRELOAD` is read when a process starts, so setting it for the
server command reaches every process vLLM spawns from it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from morphserve.errors import MorphServeError

ALLOCATORS = ("auto", "system", "tcmalloc", "jemalloc")
# Every server MorphServe starts (`morphserve serve`, and the harness's plain vLLM baselines
# beside it) reads its default here, so the two sides of a comparison run the same malloc.
ALLOCATOR_ENV = "MORPHSERVE_ALLOCATOR"

_PATTERNS = {
    "tcmalloc": ("libtcmalloc_minimal.so*", "libtcmalloc.so*"),
    "jemalloc": ("libjemalloc.so*",),
}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")


class AllocatorNotFound(MorphServeError):
    pass


def find_library(name: str, dirs: tuple[str, ...] = _LIBRARY_DIRS) -> Path | None:
    """The shortest-named match (the soname link, not a versioned file or a debug build)."""
    for d in dirs:
        for pattern in _PATTERNS[name]:
            hits = sorted((h for h in glob.glob(os.path.join(d, pattern)) if "debug" not in h), key=len)
            if hits:
                return Path(hits[0])
    return None


def default_allocator(env: dict[str, str] | None = None) -> str:
    """`MORPHSERVE_ALLOCATOR`, else 'system' (glibc's). Measured in 10-minute soaks
    (docs/RESULTS.md, "Reliability"): tcmalloc halved plain vLLM's memory growth but raised
    MorphServe's, whose swaps free large weight buffers that glibc hands back to the kernel
    at once and tcmalloc keeps; so it is an option, not the default."""
    return (env if env is not None else os.environ).get(ALLOCATOR_ENV, "system")


def resolve(name: str, dirs: tuple[str, ...] = _LIBRARY_DIRS) -> str:
    """'auto' -> 'tcmalloc' when it is installed, else 'system'."""
    if name == "auto":
        return "tcmalloc" if find_library("tcmalloc", dirs) is not None else "system"
    return name


def preload_env(name: str, env: dict[str, str], dirs: tuple[str, ...] = _LIBRARY_DIRS) -> dict[str, str]:
    """`env` with the allocator in front of LD_PRELOAD; 'system' returns it unchanged, and
    'auto' is tcmalloc where installed. Raises AllocatorNotFound with the package to install
    when a named library is missing."""
    name = resolve(name, dirs)
    if name == "system":
        return dict(env)
    if name not in _PATTERNS:
        raise AllocatorNotFound(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    lib = find_library(name, dirs)
    if lib is None:
        package = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}[name]
        raise AllocatorNotFound(f"{name} was asked for but no {'/'.join(_PATTERNS[name])} is installed "
                                f"(Debian/Ubuntu: apt-get install {package}); or use --allocator system")
    present = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if any(name in Path(p).name for p in present):
        return dict(env)
    return {**env, "LD_PRELOAD": ":".join([str(lib), *present])}
