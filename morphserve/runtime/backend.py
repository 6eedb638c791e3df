"""What a device backend must provide for MorphServe to morph on it.

The runtime (LayerSet, the controller) is written against these two protocols, not
against a device. A backend is chosen once per worker by the vLLM boundary
(morphserve.vllm.backends): the CPU backend is what every test and benchmark runs; the
CUDA backend is built to this interface but has never run (docs/CUDA.md).

- Swap one layer / restore one layer: `kernels` (quant_layers.swappable.LinearKernels)
  builds the W4 compute and the bf16 compute of a fused linear and installs either in the
  layer's forward slot. LayerSet reports the bytes each swap frees.
- KV grow / shrink: `new_kv_backing(size)` reserves address space for the largest KV once
  (addresses never move); `commit` backs byte ranges with memory before the pool shows
  their blocks, `release` hands them back after the pool has hidden them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from quant_layers.swappable import LinearKernels


@runtime_checkable
class KVBacking(Protocol):
    kind: str  # reported with every release, e.g. "host-mmap"
    size: int

    @property
    def tensor(self):
        """One int8 tensor over the whole reserve, at a fixed address."""

    def commit(self, ranges: list[tuple[int, int]]) -> int:
        """Back these byte ranges with memory; bytes newly committed (0 where the device
        commits on first touch, as anonymous host memory does)."""

    def release(self, ranges: list[tuple[int, int]]) -> int:
        """Give the memory of these byte ranges back; bytes released."""

    def resident_bytes(self) -> int:
        """Bytes of the reserve backed by memory now."""


@runtime_checkable
class MorphBackend(Protocol):
    name: str
    verified: bool  # False: built to the interface, never run on its device
    commits_on_touch: bool  # True: growing the KV needs no commit call before use
    kernels: LinearKernels

    def new_kv_backing(self, size: int) -> KVBacking: ...
