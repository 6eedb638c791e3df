"""The controller's handle on its engine core (vLLM 0.32.0): worker calls by method name,
the served model's path and length limit. The controller never holds the EngineCore."""

from __future__ import annotations

from pathlib import Path

from morphserve.errors import MorphServeError


class RankFailure(MorphServeError):
    """A worker call failed on one or more ranks; the others completed it."""

    def __init__(self, message: str, failed_ranks: list[int]):
        super().__init__(message)
        self.failed_ranks = failed_ranks


def raise_failures(method: str, results: list) -> list:
    from morphserve.vllm.worker_ext import ERROR_KEY

    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, dict) and ERROR_KEY in r]
    if failed:
        where = "; ".join(f"rank {r.get('rank', i)}: {r[ERROR_KEY]}" for i, r in failed)
        raise RankFailure(f"{method} failed on {len(failed)} of {len(results)} rank(s): {where}",
                          [int(r.get("rank", i)) for i, r in failed])
    return results


class EngineLink:
    def __init__(self, engine_core):
        self._core = engine_core

    def rpc(self, method: str, *args) -> list:
        """Call `method` on every worker by name (vLLM's collective_rpc; no pickled
        callables); one result per worker, in rank order. A failure on any rank raises
        RankFailure after every rank has replied (worker_ext.ERROR_KEY says why)."""
        return raise_failures(method, self._core.model_executor.collective_rpc(method, args=args))

    @property
    def world_size(self) -> int:
        return int(self._core.vllm_config.parallel_config.world_size)

    @property
    def model_path(self) -> Path:
        return Path(self._core.vllm_config.model_config.model)

    @property
    def dtype(self) -> str:
        """The engine's compute dtype ("torch.bfloat16", "torch.float32")."""
        return str(self._core.vllm_config.model_config.dtype)

    @property
    def max_model_len(self) -> int:
        return self._core.vllm_config.model_config.max_model_len

    @property
    def kv_cache_dtype(self) -> str:
        """vLLM's --kv-cache-dtype ("auto": the model's dtype)."""
        return str(self._core.vllm_config.cache_config.cache_dtype)
