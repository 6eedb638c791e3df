"""The bf16 masters of vLLM's fused linears (q/k/v, gate/up), fused once into a cache file.

A restore hands vLLM's bf16 prepack a master in the layout vLLM computes with. The model's
checkpoint stores q, k and v (gate and up) as separate tensors, so without this file every
restore of a fused linear first concatenates them into a new anonymous buffer: measured on
a 2-core AVX-512 Xeon, that copy was about a third of a restore. Here the concatenation
runs once, at the first start, and a restore maps the fused tensor and prepacks straight
from the map. Single linears (o_proj, down_proj) are mapped from the model's own file,
which already holds them whole, so the cache holds about two thirds of the linears' bytes.
Under tensor parallelism each rank caches its own shard of every linear (one file per rank).
An engine served in another dtype than the file's (fp32 where bf16 is emulated) caches
every linear, cast once, for the same reason: a restore then maps instead of casting.

The prepacked form itself (a oneDNN handle) is opaque and cannot be stored; vLLM's
prepack is the one copy left in a restore. The file is keyed and checked like the kernel
twins (kernel_twins): the model's files (path, size, mtime), the dtype and the fusion;
it is rebuilt if it is missing, stale or unreadable, and written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quant_layers.cache_dir import cache_root
from quant_layers.kernel_twins import cache_key, ensure_kernel_twins
from quant_layers.mapped_checkpoint import MappedCheckpoint

CACHE_FORMAT = "fused-masters-v1"


def open_fused_masters(masters: MappedCheckpoint, model_path: Path, dtype: torch.dtype,
                       fused: dict[str, tuple[int, str, tuple[str, ...]]], cutters: dict | None = None,
                       rank: tuple[int, int] = (0, 1)) -> MappedCheckpoint | None:
    """Map the fused-master cache of every multi-part linear in `fused` (name -> (layer,
    vLLM name, HF names)), building it first if needed; None if nothing is fused.

    Under tensor parallelism (`rank` = (rank, world size) with more than one rank) every
    linear is a shard of what the model file holds, so every linear is cached, cut for this
    rank by `cutters[name]` (vLLM's own weight loader), in a file of this rank's own."""
    sharded = rank[1] > 1
    cast = _file_dtype(masters, fused) not in (None, dtype)
    multi = {name: (i, hf) for name, (i, _, hf) in fused.items() if sharded or cast or len(hf) > 1}
    if not multi:
        return None

    def build(name: str) -> tuple[dict[str, torch.Tensor], dict]:
        i, hf_names = multi[name]
        keys = [f"model.layers.{i}.{n}.weight" for n in hf_names]
        with masters.reading() as reader:
            if sharded:
                weight = cutters[name].cut([reader.get(k) for k in keys], 1, dtype)
            else:
                weight = reader.fused(keys).to(dtype)
        return {"weight": weight}, {"parts": list(hf_names)}

    fusion = ";".join(f"{name}={','.join(hf)}" for name, (_, hf) in sorted(multi.items()))
    parts = [CACHE_FORMAT, str(dtype), fusion] + ([f"tp{rank[0]}of{rank[1]}"] if sharded else [])
    key = cache_key(masters.files(), *parts)
    path = cache_root() / "fused-masters" / f"{key}.safetensors"
    cache = ensure_kernel_twins(path, sorted(multi), build)
    if not _shapes_match(cache, masters, multi, dtype, cutters if sharded else None):
        path.unlink()  # a file that lies about its contents is rebuilt
        cache = ensure_kernel_twins(path, sorted(multi), build)
    return cache


def _file_dtype(masters: MappedCheckpoint, fused: dict) -> torch.dtype | None:
    """The dtype the model's file stores its linears in. An engine served in another dtype
    (fp32 where bf16 is emulated) gets every linear from this cache, cast once, so that a
    restore still prepacks straight from a map instead of casting a copy each time."""
    for i, _, hf_names in fused.values():
        key = f"model.layers.{i}.{hf_names[0]}.weight"
        if key in masters.index:
            with masters.reading() as reader:
                return reader.get(key).dtype
    return None


def _shapes_match(cache: MappedCheckpoint, masters: MappedCheckpoint, multi: dict, dtype: torch.dtype,
                  cutters: dict | None) -> bool:
    with cache.reading() as got, masters.reading() as src:
        for name, (i, hf_names) in multi.items():
            if cutters is not None:
                want = (cutters[name].out_features, cutters[name].in_features)
            else:
                parts = [src.get(f"model.layers.{i}.{n}.weight").shape for n in hf_names]
                want = (sum(p[0] for p in parts), parts[0][1])
            t = got.get(f"{name}.weight")
            if tuple(t.shape) != want or t.dtype != dtype:
                return False
    return True
