"""The W4 twins in the layout vLLM's kernel computes with, kept in a file, not in RAM.

vLLM's CPU W4A16 kernel does not compute on the compressed-tensors layout: its
`process_weights_after_loading` unpacks the int4 values to int32, repacks them along the
other axis and blocks them by 16 output channels. Measured on the 2-core machine that
costs 15-19 ms per SmolLM2 layer, so building twins from the pack at quantize time made
0 -> 30 take 0.57 s. So the repack runs once, at start-up, through vLLM's own kernel, and
its output is written to a safetensors file in the cache; a quantize then only maps that
file and copies the layer's tensors (the pack stays the source of truth; the cache file is
keyed by the pack's files, the vLLM version, the dtype and the kernel's ISA choice, and is
rebuilt if it is missing, stale or unreadable).

The key says which inputs a file was built from, not that its bytes are still what was
written: a flipped bit or an edit that kept size and mtime would be served as weights. So
the file's sha256 is written beside it at build (`<file>.sha256`) and compared each time the
file is mapped; a mismatch rebuilds it. Hashing is ~1 GB/s on one core, about 0.06 s for
SmolLM2's W4 twins and 0.2 s for its fused bf16 masters.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quant_layers.mapped_checkpoint import MappedCheckpoint


def cache_key(pack_files: list[Path], *parts: str) -> str:
    h = hashlib.sha256()
    for path in sorted(pack_files):
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()[:24]


def ensure_kernel_twins(path: Path, names: list[str], build: Callable[[str], tuple[dict, dict]]) -> MappedCheckpoint:
    """Map the kernel-layout twin file at `path`, building it first if needed.

    `build(name)` returns (tensors, attrs) of one fused linear, as vLLM's kernel left them;
    tensors are stored as `{name}.{param}`, attrs (plain strings/bools) in the metadata.
    """
    if not _usable(path, names):
        tensors: dict[str, torch.Tensor] = {}
        attrs: dict[str, dict] = {}
        for name in names:
            t, a = build(name)
            tensors.update({f"{name}.{k}": v.contiguous() for k, v in t.items()})
            attrs[name] = a
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"attrs": json.dumps(attrs)})
        digest = file_sha256(Path(tmp))
        os.replace(tmp, path)  # atomic: concurrent servers never see a half-written file
        _write_atomically(digest_path(path), digest)
        del tensors
    with safe_open(path, "pt") as f:
        index = {k: path for k in f.keys()}
    return MappedCheckpoint(index)


def kernel_attrs(path: Path) -> dict[str, dict]:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["attrs"])


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _usable(path: Path, names: list[str]) -> bool:
    if not path.exists():
        return False
    try:
        attrs = kernel_attrs(path)
        recorded = digest_path(path).read_text().strip()
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        return False  # a stale or corrupt cache file is rebuilt, never trusted
    return set(attrs) == set(names) and recorded == file_sha256(path)
