"""The device backend a worker morphs with (morphserve.runtime.backend.MorphBackend).

CPU is the backend every test, benchmark and result in this repository ran on. CUDA is
built to the same interface and has never run: it is refused at start-up unless the
operator sets MORPHSERVE_UNVERIFIED_CUDA=1 (docs/CUDA.md: what is built, what is not).
"""

from __future__ import annotations

import os

UNVERIFIED_CUDA_ENV = "MORPHSERVE_UNVERIFIED_CUDA"
CUDA_REFUSAL = (f"MorphServe's CUDA backend is unverified (it has never run on a GPU; docs/CUDA.md); "
                f"set {UNVERIFIED_CUDA_ENV}=1 to try it anyway")
CUDA_COMPILE_REFUSAL = ("MorphServe runs compiled (\"compile\": true, morphserve serve --compile) on CPU only: its "
                        "linears' slots are CPU closures, and a CUDA graph would keep a swapped layer's old kernel; "
                        "drop \"compile\" on this GPU (MorphServe then runs eager)")


def cuda_opted_in() -> bool:
    return os.environ.get(UNVERIFIED_CUDA_ENV) == "1"


class CpuBackend:
    name = "cpu"
    verified = True
    commits_on_touch = True  # anonymous mmap pages are committed by their first write

    def __init__(self, kv_huge_pages: bool = False, compiled: bool = False):
        from morphserve.vllm.kernels import VllmCpuKernels

        self.kernels = VllmCpuKernels(compiled=compiled)
        self.kv_huge_pages = kv_huge_pages

    def new_kv_backing(self, size: int):
        from kv_resize.host_backing import HostKVBacking

        return HostKVBacking(size, huge=self.kv_huge_pages)


class CudaBackend:
    """UNVERIFIED. Twins and masters in host memory, copied to the device on a swap
    (VllmCudaKernels.place); KV on CUDA virtual memory, whose pages must be mapped before
    the pool shows their blocks (commits_on_touch False)."""

    name = "cuda"
    verified = False
    commits_on_touch = False

    def __init__(self, device: int = 0):
        from morphserve.vllm.cuda_kernels import VllmCudaKernels

        self.device = device
        self.kernels = VllmCudaKernels(f"cuda:{device}")

    def new_kv_backing(self, size: int):
        from kv_resize.cuda_backing import CudaVMMBacking

        return CudaVMMBacking(size, self.device)


def backend_for(device_type: str, kv_huge_pages: bool = False, compiled: bool = False):
    """The backend for a worker on `device_type` ("cpu" or "cuda"); `kv_huge_pages`: the CPU
    KV reserve advised huge (kv_resize.host_backing; CUDA's VMM backing maps its own pages);
    `compiled`: the engine runs vLLM's compiled CPU graph (the linears go through slots)."""
    from morphserve.errors import MorphServeError

    if device_type == "cpu":
        return CpuBackend(kv_huge_pages, compiled)
    if device_type == "cuda":
        if not cuda_opted_in():
            raise MorphServeError(CUDA_REFUSAL)
        if compiled:  # CUDA graphs and Inductor would keep a swapped layer's old kernel: no slots there
            raise MorphServeError(CUDA_COMPILE_REFUSAL)
        return CudaBackend()
    raise MorphServeError(f"MorphServe has no backend for device type {device_type!r} (cpu; cuda, unverified)")
