"""Which CPUs run the model: vLLM's automatic binding, or every CPU the server may use.

vLLM's CPU backend binds each worker's OpenMP threads to cores and, on x86, keeps one CPU
per rank out of that binding for the engine core ("at least reserve 1 core for scheduler
proc", `vllm/utils/ompmultiprocessing.py`). On a large machine that is a rounding error; on
a 2-CPU one it is half the machine: the model computes on one core while the engine core,
which mostly waits for the step, holds the other. Measured on a 2-vCPU Zen 4 EPYC
(docs/RESULTS.md, "Every CPU computing"), a 1,344-token prompt's step took 1.89-1.97 s with
vLLM's binding and 0.94 s with both CPUs computing, as in an in-process engine.

`all` sets vLLM's own knob for this, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`, so its automatic
binding gives each rank every CPU of its node; the engine core and the API server then share
those CPUs with the model's threads. `vllm` (the default) leaves vLLM's binding as it is.
An operator's own `VLLM_CPU_NUM_OF_RESERVED_CPU` or `VLLM_CPU_OMP_THREADS_BIND` always wins.
Plain Python on an environment dict: `apply` is the only call that changes anything.
"""

from __future__ import annotations

RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
MODES = ("all", "vllm")
DEFAULT_MODE = "vllm"


def apply(env: dict, mode: str) -> str | None:
    """Set vLLM's reserve to none in `env` for `all`; returns the value set, or None where
    nothing changed (`vllm`, or the operator chose a reserve or a binding)."""
    if mode not in MODES:
        raise ValueError(f"compute CPUs {mode!r}: one of {', '.join(MODES)}")
    if mode == "vllm" or operator_chose(env):
        return None
    env[RESERVED_ENV] = "0"
    return "0"


def operator_chose(env: dict) -> bool:
    """True where the operator set vLLM's reserve or its binding: `all` then changes nothing."""
    return RESERVED_ENV in env or env.get(BIND_ENV, "auto") != "auto"


def describe(env: dict, mode: str) -> str:
    """One line for a server's start-up: who decides which CPUs compute."""
    if env.get(BIND_ENV, "auto") != "auto":
        return f"compute CPUs: {BIND_ENV}={env[BIND_ENV]} (set by the operator or for tensor-parallel ranks)"
    if RESERVED_ENV in env:
        chosen = " (--compute-cpus all)" if mode == "all" and env[RESERVED_ENV] == "0" else " (set by the operator)"
        return f"compute CPUs: vLLM's binding with {RESERVED_ENV}={env[RESERVED_ENV]}{chosen}"
    return ("compute CPUs: vLLM's binding (one CPU per rank kept for the engine core; --compute-cpus all computes "
            "on every CPU)")
