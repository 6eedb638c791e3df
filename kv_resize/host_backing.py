"""Host (CPU) KV backing: reserve address space for the largest KV, back only what is used.

vLLM allocates its KV cache as one zero-filled int8 buffer (`torch.zeros`), which touches
and so commits every page. We give vLLM an anonymous private mmap instead: its pages are
zero on first touch and cost no memory until written, so reserving room for the most
quantized level is free. When the pool shrinks, `release` hands the pages of the dropped
blocks back with madvise(MADV_DONTNEED); they read as zeros if ever used again.
Python's mmap exposes exactly these two calls, so no native code is needed.

`huge=True` also advises the reserve huge (madvise(MADV_HUGEPAGE)), as torch advises plain
vLLM's KV tensor when a server asks for huge pages: attention then reads the cache through
2 MiB pages. The price is granularity: a layer's blocks are one run in vLLM's CPU layout, and
a 2 MiB page is committed whole on its first touch, so resident KV rounds up to 2 MiB per
layer run (SmolLM2-135M: about 21 blocks of one layer per page). Released ranges are advised
back to small pages first, so khugepaged never collapses freed blocks into a committed page.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import numpy as np
import torch

PAGE = mmap.PAGESIZE


class HostKVBacking:
    kind = "host-mmap"

    def __init__(self, size: int, huge: bool = False):
        self.size = size
        self.huge = huge
        self._map = mmap.mmap(-1, max(size, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if huge:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.int8, count=size)

    def resident_bytes(self) -> int:
        """Bytes of the reserve backed by memory now (mincore), so a soak can tell KV pages
        that were touched and kept from memory that leaks. Python's mmap has no mincore."""
        pages = -(-max(self.size, PAGE) // PAGE)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(pages * PAGE), vec) != 0:
            return -1
        return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * PAGE

    def commit(self, ranges: list[tuple[int, int]]) -> int:
        """Nothing to do: anonymous pages are committed by the first write to them."""
        return 0

    def release(self, ranges: list[tuple[int, int]]) -> int:
        """Give back the pages inside each [start, end) byte range; returns bytes advised."""
        advised = 0
        for start, end in ranges:
            lo = -(-start // PAGE) * PAGE  # only whole pages inside the range
            hi = min(end, self.size) // PAGE * PAGE
            if hi > lo:
                if self.huge:
                    self._map.madvise(mmap.MADV_NOHUGEPAGE, lo, hi - lo)
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                advised += hi - lo
        return advised


@dataclass(frozen=True)
class KVTensorLayout:
    """Where one KV tensor's blocks lie in the backing: layer l's block b starts at
    offset + l*layer_stride + b*block_stride (vLLM's KVCacheTensor, read by the boundary's
    morphserve.vllm.kv_cache.tensor_layouts)."""

    offset: int
    layer_stride: int
    block_stride: int
    num_layers: int


def tail_ranges(tensors: list[KVTensorLayout], first_block: int, last_block: int) -> list[tuple[int, int]]:
    """Byte ranges of blocks first_block..last_block in every layer of the KV tensors.

    In the CPU backend's layer-outermost layout each layer's tail is one contiguous run.
    """
    ranges = []
    if last_block < first_block:
        return ranges
    for t in tensors:
        for layer in range(t.num_layers):
            base = t.offset + layer * t.layer_stride
            if t.block_stride < t.layer_stride:  # layer-outermost: one run per layer
                ranges.append((base + first_block * t.block_stride, base + (last_block + 1) * t.block_stride))
            else:  # block-outermost: one page per block per layer
                ranges.extend((base + b * t.block_stride, base + b * t.block_stride + t.layer_stride)
                              for b in range(first_block, last_block + 1))
    return _merge(ranges)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged
