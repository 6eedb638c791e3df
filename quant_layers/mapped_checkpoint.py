"""Read-only, zero-copy access to safetensors checkpoints: the CPU analogue of pinned host copies.

On a CPU server the "host memory" where the paper keeps bf16 masters and idle W4 twins is
the same RAM the budget covers. The only memory that costs nothing while idle is the page
cache of a file, so masters and twins stay in their safetensors files and are read only
while a layer changes precision.

safetensors (>= 0.4, torch framework) backs `get_tensor` with `UntypedStorage.from_file`,
a private read-only file map: the tensors it returns are views of file pages, not
anonymous copies (checked: reading all 256 MiB of SmolLM2 moves RssFile, not RssAnon).
The map lives as long as a tensor views it, so a `reading()` block that is left drops
every mapped page from the process's RSS; the pages stay in the page cache, reclaimable.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


# Bytes per element of each safetensors dtype tag (the header's "dtype"), and the float ones.
TAG_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
             "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16"})


def slice_bytes(sl, float_width: int | None = None) -> int:
    """Bytes of one tensor from its safetensors header slice (`safe_open(...).get_slice`),
    nothing read; `float_width`: its floating-point elements counted at that width instead
    (an engine holding them in another dtype)."""
    numel = 1
    for d in sl.get_shape():
        numel *= d
    tag = sl.get_dtype()
    return numel * (float_width if float_width is not None and tag in FLOAT_TAGS else TAG_BYTES.get(tag, 4))


class MappedCheckpoint:
    """Tensor name -> safetensors file, opened on demand."""

    def __init__(self, index: dict[str, Path]):
        self.index = dict(index)

    @contextlib.contextmanager
    def reading(self) -> Iterator["CheckpointReader"]:
        reader = CheckpointReader(self.index)
        try:
            yield reader
        finally:
            reader.close()

    def files(self) -> list[Path]:
        return sorted(set(self.index.values()))

    def drop_page_cache(self) -> None:
        """Evict these files' clean pages (posix_fadvise DONTNEED): the next read is cold."""
        for path in self.files():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class CheckpointReader:
    """Open file maps for the duration of one transition."""

    def __init__(self, index: dict[str, Path]):
        self._index = index
        self._open: dict[Path, object] = {}

    def get(self, key: str) -> torch.Tensor:
        path = self._index[key]
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = safe_open(path, "pt")
        return handle.get_tensor(key)

    def has(self, key: str) -> bool:
        return key in self._index

    def fused(self, keys: list[str]) -> torch.Tensor:
        """Row-wise concatenation (vLLM's q/k/v and gate/up fusion), as a new contiguous tensor."""
        parts = [self.get(k) for k in keys]
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0].clone()

    def close(self) -> None:
        self._open.clear()
