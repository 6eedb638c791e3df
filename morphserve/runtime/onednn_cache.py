"""How many compiled kernels oneDNN keeps: the capacity of its global primitive cache.

vLLM's CPU linears (bf16 `onednn_mm`, int8 `onednn_scaled_mm`) are oneDNN primitives,
compiled once per batch shape (the number of tokens in a step). oneDNN keeps the last 1,024
of them in a process-wide cache by default, and a primitive compiled for a large prefill
holds megabytes. A server sees a new token count at almost every mixed step, so its worker
grows for as long as new counts appear: measured with vLLM's own kernels
(`scripts/bench_onednn_cache.py`), 120 linears fed 86 distinct shapes grew by 239 MiB with
the default and by 124 MiB with a capacity of 64, at the same speed (vLLM keeps its own
32-entry cache per linear, which is what serves the steps); in 10-minute soaks the bound
took MorphServe from +3.7% to -0.7% and plain vLLM from +4.8% to +1.3% (docs/RESULTS.md,
"Hardening, round two").

oneDNN reads `ONEDNN_PRIMITIVE_CACHE_CAPACITY` once, when a process compiles its first
primitive, and neither vLLM nor torch exports a call to change it later; so it is set in the
environment the server's processes start with. An operator's own value always wins.
"""

from __future__ import annotations

import os
from typing import MutableMapping

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
DEFAULT_CAPACITY = 64
ONEDNN_DEFAULT = 1024  # oneDNN's own default, for reports


def bounded(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`env` with the capacity set, unless it already names one."""
    env.setdefault(ONEDNN_CACHE_ENV, str(DEFAULT_CAPACITY))
    return env


def capacity(env: MutableMapping[str, str] | None = None) -> int:
    """The capacity processes started with `env` get (oneDNN's default when unset or unreadable)."""
    value = (os.environ if env is None else env).get(ONEDNN_CACHE_ENV, "")
    try:
        return max(int(value), 0)
    except ValueError:
        return ONEDNN_DEFAULT
