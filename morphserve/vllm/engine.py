"""The controller's handle on its engine core (vLLM 0.32.0): worker calls by method name,
the served model's path and length limit. The controller never holds the EngineCore."""

from __future__ import annotations

from pathlib import Path


class EngineLink:
    def __init__(self, engine_core):
        self._core = engine_core

    def rpc(self, method: str, *args) -> list:
        """Call `method` on every worker by name (vLLM's collective_rpc; no pickled
        callables); one result per worker."""
        return self._core.model_executor.collective_rpc(method, args=args)

    @property
    def model_path(self) -> Path:
        return Path(self._core.vllm_config.model_config.model)

    @property
    def max_model_len(self) -> int:
        return self._core.vllm_config.model_config.max_model_len
