"""Worker-side KV cache: vLLM's allocation on MorphServe's host backing, block copies and
block-table remaps, and the layout of vLLM's KV tensors as plain data (for vLLM 0.32.0).

`allocate_kv_cache` is a copy of vLLM's with one line changed, so its upstream source is
pinned by hash: if vLLM's function changes, `check_upstream_allocate()` (run by
`patches.check_supported` for every MorphServe engine) stops its start-up with one line
instead of running a stale copy; plain engines are untouched.
"""

from __future__ import annotations

import hashlib

from kv_resize.host_backing import KVTensorLayout
from morphserve.errors import MorphServeError

_KV_BACKING: dict = {"backend": None, "backing": None}


def take_backing_request():
    """The backend morphserve_init asked to back this allocation, if any (then cleared)."""
    backend, _KV_BACKING["backend"] = _KV_BACKING["backend"], None
    return backend


def enable_kv_backing(backend) -> None:
    """Called in a worker by morphserve_init: this worker's next KV allocation (and only
    that one, so a later plain engine in the same process allocates as vLLM does) goes on
    the backend's reserve-then-commit backing."""
    _KV_BACKING["backend"], _KV_BACKING["backing"] = backend, None


def kv_backing():
    return _KV_BACKING["backing"]


def allocate_on_backing(backend, kv_cache_config, device, layout, kernel_block_sizes):
    """vllm.v1.worker.utils.allocate_kv_cache (0.32.0) with one line changed: the backing
    buffer is the backend's reserve (on CPU an anonymous mmap, kv_resize.host_backing)
    instead of torch.zeros, which would touch, and so commit, the whole reserve. The
    view-building below is vLLM's."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs
    from vllm.v1.worker.utils import create_kv_cache_views

    sizes = {t.size for t in kv_cache_config.kv_cache_tensors}
    assert len(sizes) == 1, "KV cache tensors must share one backing allocation."
    backing = backend.new_kv_backing(sizes.pop())
    _KV_BACKING["backing"] = backing
    buf = backing.tensor
    kv_caches = {}
    for tensor in kv_cache_config.kv_cache_tensors:
        layer_name = tensor.layers[0]
        group_id, group = next((gid, g) for gid, g in enumerate(kv_cache_config.kv_cache_groups)
                               if layer_name in g.layer_names)
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[layer_name]
        if not spec.has_layer_views:
            kv_caches.update((name, buf) for name in tensor.layers)
            continue
        kernel_block_size = None
        if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
            kernel_block_size = kernel_block_sizes[group_id]
        views = create_kv_cache_views(buf, spec, kv_cache_config.num_blocks_of(tensor), layout, tensor,
                                      kernel_block_size=kernel_block_size)
        kv_caches.update(zip(tensor.layers, views))
    return kv_caches


def copy_kv_blocks(model_runner, pairs: list[tuple[int, int]]) -> None:
    """vLLM's own in-place block copy (the one it uses for copy-on-write)."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
    from vllm.v1.worker.utils import copy_kv_cache_blocks_inplace

    copies = [KVCacheBlockCopy(src_block_id=s, dst_block_id=d) for s, d in pairs]
    copy_kv_cache_blocks_inplace(model_runner.kv_caches, model_runner.kv_cache_config.num_blocks, copies)


def remap_worker_block_tables(model_runner, moves: dict[int, int]) -> None:
    """Rewrite the worker's copies of the block tables: each cached request's block_ids
    and the persistent batch's table (scheduler block ids, one row per request)."""
    import numpy as np

    for state in model_runner.requests.values():
        for ids in state.block_ids:
            ids[:] = [moves.get(i, i) for i in ids]
    src = np.fromiter(moves.keys(), dtype=np.int64)
    dst = np.fromiter(moves.values(), dtype=np.int64)
    for table in model_runner.input_batch.block_table.block_tables:
        arr = table.block_table.np
        hit = np.isin(arr, src)
        if hit.any():
            lookup = dict(zip(src.tolist(), dst.tolist()))
            arr[hit] = np.vectorize(lookup.__getitem__, otypes=[arr.dtype])(arr[hit])




# sha256 of allocate_kv_cache's source lines in vllm/v1/worker/utils.py (vLLM 0.32.0), the
# function `allocate_on_backing` copies.
UPSTREAM_ALLOCATE_SHA256 = "b1f3e24311485a090404f9ca264b1325cc0a965023221a46c18f45acf3c0ddfd"


def upstream_allocate_sha256() -> str:
    """The hash of allocate_kv_cache's source lines as vLLM ships them, read from the file
    rather than imported: importing vllm.v1.worker.utils here would bind whatever
    `current_platform` is at that moment into it for good (the API server never needs it)."""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    source = (root / "v1" / "worker" / "utils.py").read_text()
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "allocate_kv_cache":
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return hashlib.sha256("".join(lines[first - 1:node.end_lineno]).encode()).hexdigest()
    return "missing"


def check_upstream_allocate() -> None:
    """Refuse to run the copied allocation if vLLM's own has changed since it was copied."""
    found = upstream_allocate_sha256()
    if found != UPSTREAM_ALLOCATE_SHA256:
        raise MorphServeError(
            "vllm.v1.worker.utils.allocate_kv_cache differs from the one MorphServe's host KV backing copies "
            f"(sha256 {found[:12]}, expected {UPSTREAM_ALLOCATE_SHA256[:12]}); update "
            "morphserve/vllm/kv_cache.py for this vLLM")


def tensor_layouts(kv_cache_config) -> list[KVTensorLayout]:
    """vLLM's KVCacheTensor list as plain layouts (kv_resize does not read vLLM objects)."""
    return [KVTensorLayout(offset=t.offset, layer_stride=t.layer_stride, block_stride=t.block_stride,
                           num_layers=len(t.layers)) for t in kv_cache_config.kv_cache_tensors]
