"""Which malloc the server's processes run with.

vLLM's CPU docs recommend preloading tcmalloc; vLLM 0.32 does it itself only for a copy
shipped in `vllm/libs`, and the CPU wheel ships none. So the system's copy (Debian:
libtcmalloc-minimal4, libjemalloc2) is found here and put in front of `LD_PRELOAD` for the
server's processes. `LD_PRELOAD` is read when a process starts, so setting it for the
server command reaches every process vLLM spawns from it.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

ALLOCATORS = ("system", "tcmalloc", "jemalloc")

_PATTERNS = {
    "tcmalloc": ("libtcmalloc_minimal.so*", "libtcmalloc.so*"),
    "jemalloc": ("libjemalloc.so*",),
}
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")


class AllocatorNotFound(RuntimeError):
    pass


def find_library(name: str, dirs: tuple[str, ...] = _LIBRARY_DIRS) -> Path | None:
    """The shortest-named match (the soname link, not a versioned file or a debug build)."""
    for d in dirs:
        for pattern in _PATTERNS[name]:
            hits = sorted((h for h in glob.glob(os.path.join(d, pattern)) if "debug" not in h), key=len)
            if hits:
                return Path(hits[0])
    return None


def preload_env(name: str, env: dict[str, str], dirs: tuple[str, ...] = _LIBRARY_DIRS) -> dict[str, str]:
    """`env` with the allocator in front of LD_PRELOAD; 'system' returns it unchanged.
    Raises AllocatorNotFound with the package to install when the library is missing."""
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
