"""An in-process vLLM engine that tests and benchmarks drive one step at a time.

Engine tests and the step-level benchmarks need what a server hides: the EngineCore (its
scheduler, MorphServe's controller on it) and the boundary between two engine steps, where
they change the level, sample the scheduler or time a step. That means reaching into
vLLM 0.32.0's internals (`llm.llm_engine.engine_core.engine_core`, `LLMEngine.step`), so
this module sits in the vLLM boundary package; callers get plain Python back.

The settings below are process environment (VLLM_PLUGINS, the KV space, in-process engine
core): a plain-vLLM baseline beside a MorphServe engine runs in a process of its own.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

if TYPE_CHECKING:
    from vllm import LLM
    from vllm.v1.engine.core import EngineCore

Prompt = Union[str, list[int]]  # text, or token ids


def in_process_llm(model: str | Path, pack: str | Path | None = None, twin: str | None = None,
                   morph: dict | None = None, **llm_kw: Any) -> LLM:
    """A vLLM `LLM` whose engine core runs in this process, seed 0, bf16 unless `dtype` is
    given (fp32 is the fast dtype where the CPU emulates bf16).

    With `pack`, MorphServe is on (`twin` picks the twin kind, default the pack's own;
    `morph` adds other MorphServe settings);
    without, no general plugin loads at all: plain vLLM. `llm_kw` goes to `LLM` as is.
    An explicit `kv_cache_memory_bytes` would be overridden by VLLM_CPU_KVCACHE_SPACE, so
    that is dropped; otherwise the KV space defaults to 1 GiB.
    """
    if "kv_cache_memory_bytes" in llm_kw:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core lives in this process
    from morphserve.runtime import onednn_cache

    onednn_cache.bounded(os.environ)  # plain and MorphServe alike (effective if no kernel ran here yet)
    if pack is None:
        os.environ["VLLM_PLUGINS"] = ""
    from morphserve.vllm.kernels import W4A16_ENV

    # A plain engine serving 4-bit weights (a static W4 baseline) runs the 4-bit kernel
    # MorphServe serves; MorphServe's plugin pins the same setting when it is on.
    os.environ.update(W4A16_ENV)
    from vllm import LLM

    if pack is not None:
        config = {"pack": str(pack), **({"twin": twin} if twin is not None else {}), **(morph or {})}
        llm_kw["additional_config"] = {"morphserve": config}
    llm_kw.setdefault("dtype", "bfloat16")
    return LLM(model=str(model), seed=0, **llm_kw)


def engine_core_of(llm: LLM) -> EngineCore:
    """The EngineCore of an in-process `LLM`: its scheduler, model executor and, when
    MorphServe is on, the `morphserve_*` methods the plugin adds."""
    return llm.llm_engine.engine_core.engine_core


def shut_down(llm: LLM) -> None:
    """Stop the engine and its worker processes now (with tensor parallelism they would
    otherwise live until the interpreter exits)."""
    llm.llm_engine.engine_core.shutdown()


@dataclass
class StepRun:
    tokens: dict[str, list[int]]  # request id -> output token ids, for every request that finished
    step_seconds: list[float]  # wall time of each engine step, the first one (prefill) included


def run_greedy(llm: LLM, prompts: Mapping[str, Prompt], max_tokens: int | Mapping[str, int],
               on_step: Callable[[int], None] | None = None) -> StepRun:
    """Add every request before the first step, as plain vLLM's `LLM.generate` does (batch
    composition changes bf16 rounding on CPU, so outputs compare only under the same
    schedule), then step the engine until none is left.

    Greedy, ignoring EOS: outputs are exactly `max_tokens` long and comparable token for
    token. `on_step(n)` runs after the n-th step (n from 1), at the step boundary where a
    caller changes the level or samples the scheduler; its time is not in `step_seconds`.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    for request_id, prompt in prompts.items():
        n = max_tokens if isinstance(max_tokens, int) else max_tokens[request_id]
        engine.add_request(request_id, prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    run = StepRun({}, [])
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        run.step_seconds.append(time.perf_counter() - t)
        for out in outputs:
            if out.finished:
                run.tokens[out.request_id] = list(out.outputs[0].token_ids)
        if on_step is not None:
            on_step(len(run.step_seconds))
    return run


def controller_of(core: EngineCore):
    """MorphServe's controller on this engine core, or None on a plain engine."""
    return getattr(core, "_morphserve", None)


def layer_set_of(core: EngineCore):
    """The swappable layers of an in-process engine's worker (one rank), for a benchmark that
    installs forwards of its own (scripts/bench_prefill_twins.py); the server never does."""
    return core.model_executor.driver_worker.worker._morph


def model_of(core: EngineCore):
    """The model of an in-process engine's worker (one rank), for a benchmark that swaps a
    module's forward of its own (scripts/bench_head.py); the server never does."""
    return core.model_executor.driver_worker.worker.model_runner.model


def worker_call(core: EngineCore, method: str, *args: Any) -> Any:
    """The first worker's answer to a `morphserve_*` method, called by name (raises
    RankFailure if any rank failed)."""
    from morphserve.vllm.engine import raise_failures

    return raise_failures(method, core.model_executor.collective_rpc(method, args=args))[0]


def worker_calls(core: EngineCore, method: str, *args: Any) -> list:
    """Every rank's answer to a `morphserve_*` method, in rank order."""
    from morphserve.vllm.engine import raise_failures

    return raise_failures(method, core.model_executor.collective_rpc(method, args=args))


def kv_capacity_blocks(core: EngineCore) -> int:
    """Usable KV blocks vLLM's block pool reports (the null block not counted)."""
    return core.scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1


def running_requests(core: EngineCore) -> int:
    return core.scheduler.get_request_counts()[0]


# vLLM's switch for its per-step-size forward timer (seconds between its log lines; < 0: off)
FORWARD_TIMER_ENV = "VLLM_LOG_BATCHSIZE_INTERVAL"


def recorded_forward_times() -> dict[int, list[float]] | None:
    """vLLM's own record of forward milliseconds by step size (tokens) in this process: the timer
    VLLM_LOG_BATCHSIZE_INTERVAL turns on (vllm/forward_context.py), read here instead of from its
    log line; the caller may clear it between measurements. None where the timer is off (the
    variable must be set before vLLM is imported)."""
    from vllm import forward_context

    return forward_context.batchsize_forward_time if forward_context.track_batchsize else None
