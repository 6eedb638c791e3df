"""Worker side of MorphServe: added to vLLM's worker class via `worker_extension_cls`.

The engine core calls these methods by name through `collective_rpc` at step boundaries
(never with pickled callables). Arguments and results are plain lists and dicts.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

from kv_resize.host_backing import tail_ranges
from morphserve.offline import pack as packfmt
from morphserve.runtime.faults import maybe_fail
from morphserve.vllm import patches as vp
from morphserve.offline.default_model import cache_root
from morphserve.runtime.proc_memory import process_rss
from quant_layers.kernel_twins import cache_key, ensure_kernel_twins, kernel_attrs
from quant_layers.mapped_checkpoint import MappedCheckpoint
from quant_layers.model_info import read_model_info
from quant_layers.restore_prep import LayerCost, RestorePreparer
from quant_layers.swappable import IdentityTwin, PackedShard, Readers, SwappableLinear, W4Twin, process_for_kernel
from quant_layers.twin import index_safetensors, open_twin


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS so RSS reflects what a swap released."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MorphWorkerExtension:
    _morph_layers: dict[int, list[SwappableLinear]]

    def morphserve_init(self, cfg: dict) -> dict:
        """Attach a SwappableLinear to every fused linear of every decoder layer.

        Nothing is kept in RAM: the bf16 masters stay in the model's safetensors files and
        the W4 twins, once put in the kernel's layout, in a cache file (kernel_twins); both
        are read through read-only maps when a layer changes precision. Opening the twin
        checks it against the model (shapes, every tensor).
        """
        t0 = time.monotonic()
        pack_dir = Path(cfg["pack"])
        manifest = packfmt.load_manifest(pack_dir)
        model_path = Path(self.vllm_config.model_config.model)
        info = read_model_info(model_path)
        twin_ckpt = open_twin(pack_dir / manifest.quantized_dir, info)
        dtype = self.vllm_config.model_config.dtype
        self._masters = MappedCheckpoint(index_safetensors(model_path))
        layers = vp.decoder_layers(self.model_runner.model)
        elem = torch.empty(0, dtype=dtype).element_size()
        identity = cfg.get("twin") == "identity"
        fused = {f"layers.{i}.{vllm_name}": (i, vllm_name, hf_names)
                 for i in range(manifest.num_layers) for vllm_name, hf_names in vp.FUSED_LINEARS}
        for i, _, hf_names in fused.values():
            missing = [n for n in hf_names if f"model.layers.{i}.{n}.weight" not in self._masters.index]
            if missing:
                raise RuntimeError(f"model checkpoint {model_path} lacks model.layers.{i}.{missing[0]}.weight")

        def kernel_layout(name: str):
            i, _, hf_names = fused[name]
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            with MappedCheckpoint(twin_ckpt.tensors).reading() as pack:
                shards = [PackedShard(pack.get(f"{k}.weight_packed"), pack.get(f"{k}.weight_scale")) for k in keys]
                tensors, attrs = process_for_kernel(shards, info.linear_shapes[hf_names[0]][1],
                                                    twin_ckpt.group_size, dtype)
            return tensors, {**attrs, "params": sorted(tensors)}

        if identity:
            self._twins, attrs = MappedCheckpoint({}), {}
        else:
            pack_files = sorted(set(twin_ckpt.tensors.values()))
            key = cache_key(pack_files, vp.SUPPORTED_VLLM, str(dtype), vp.wna16_variant(dtype))
            path = cache_root() / "kernel-twins" / f"{key}.safetensors"
            self._twins = ensure_kernel_twins(path, list(fused), kernel_layout)
            attrs = kernel_attrs(path)
        self._morph_layers = {}
        vp.enable_host_kv_backing()  # the KV cache is allocated after this call
        for name, (i, vllm_name, hf_names) in fused.items():
            in_features = info.linear_shapes[hf_names[0]][1]
            out_features = sum(info.linear_shapes[n][0] for n in hf_names)
            twin = IdentityTwin() if identity else W4Twin(name, in_features, out_features,
                                                           twin_ckpt.group_size, dtype, attrs[name])
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            swap = SwappableLinear(layers[i].get_submodule(vllm_name), keys, twin, out_features * in_features * elem)
            self._morph_layers.setdefault(i, []).append(swap)
        _trim_heap()
        return {"layers": len(self._morph_layers), "seconds": time.monotonic() - t0, "rss": rss_bytes()}

    def morphserve_apply(self, quantize: list[int], restore: list[int]) -> dict:
        """Quantize then restore the given layers; report the bytes and the time it took."""
        t0 = time.monotonic()
        rss_before = rss_bytes()  # every call ends trimmed, so this delta is this call's
        freed = gross = 0  # net bytes (bf16 - W4) and bf16 bytes
        changed: list[SwappableLinear] = []
        with self._masters.reading() as masters, self._twins.reading() as twins:
            readers = Readers(masters, twins)
            try:
                for i in restore:
                    for s in self._morph_layers[i]:
                        if s.quantized:
                            freed -= s.fp_bytes - s.live_bytes
                            gross -= s.fp_bytes
                            s.to_full(readers)
                            changed.append(s)
                            maybe_fail("restore")
                for i in quantize:
                    for s in self._morph_layers[i]:
                        if not s.quantized:
                            s.to_quantized(readers)
                            changed.append(s)
                            maybe_fail("quantize")
                            freed += s.fp_bytes - s.live_bytes
                            gross += s.fp_bytes
            except Exception:
                # Undo this call's swaps so every layer is wholly in one state again.
                for s in reversed(changed):
                    s.to_full(readers) if s.quantized else s.to_quantized(readers)
                raise
        _trim_heap()
        return {"fp_bytes_freed": gross, "bytes_freed": freed, "rss_delta": rss_before - rss_bytes(),
                "seconds": time.monotonic() - t0, "quantized": self.morphserve_quantized()}

    # -- restores prepared in the background ------------------------------------------
    def morphserve_restore_begin(self, layers: list[int]) -> dict:
        """Start preparing these layers' bf16 prepacks in a thread; nothing changes yet."""
        self.morphserve_restore_cancel()
        swaps = self._morph_layers
        costs = {i: LayerCost(sum(s.fp_bytes for s in swaps[i]), sum(s.live_bytes for s in swaps[i])) for i in layers}

        def prepare(i: int) -> list:
            with self._masters.reading() as masters, self._twins.reading() as twins:
                readers = Readers(masters, twins)
                return [s.prepare_full(readers) if s.quantized else None for s in swaps[i]]

        # One intra-op thread for the preparer (torch's setting is per thread): the forward
        # pass keeps all of its threads and the two contend for one core, not all of them.
        self._restore = RestorePreparer(layers, costs, prepare, thread_init=lambda: torch.set_num_threads(1))
        return {"started": len(layers)}

    def morphserve_restore_commit(self) -> dict:
        """Install every layer prepared so far (called at a step boundary)."""
        prep = getattr(self, "_restore", None)
        if prep is None:
            return {"active": False, "committed": [], "done": True, "error": None,
                    "quantized": self.morphserve_quantized()}
        committed, fp_bytes = [], 0
        for i, closures in prep.take_ready():
            for s, closure in zip(self._morph_layers[i], closures):
                if closure is not None:
                    fp_bytes += s.fp_bytes
                    s.commit_full(closure)
            committed.append(i)
            maybe_fail("restore_commit")  # this layer is installed whole; the rest stay W4
        error = repr(prep.error) if prep.error is not None else None
        done = prep.remaining == 0
        if done or error:
            prep.cancel()
            self._restore = None
        if committed:
            _trim_heap()
        return {"active": True, "committed": committed, "fp_bytes_restored": fp_bytes, "done": done,
                "error": error, "quantized": self.morphserve_quantized()}

    def morphserve_restore_cancel(self) -> dict:
        """Drop a restore in progress; layers already installed stay bf16."""
        prep = getattr(self, "_restore", None)
        if prep is not None:
            prep.cancel()
            self._restore = None
            _trim_heap()
        return {"quantized": self.morphserve_quantized()}

    def morphserve_memory(self, kv_resident: bool = False) -> dict:
        """What this worker holds: weights the model computes with (in whichever precision),
        twins resident outside the model (none: they stay in the pack file), and its RSS.
        Read on every /morphserve/state and /metrics scrape, so it does not trim the heap
        (transitions already end trimmed)."""
        params = sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters())
        live = sum(s.live_bytes for swaps in self._morph_layers.values() for s in swaps)
        prep = getattr(self, "_restore", None)
        backing = vp.host_kv_backing()
        return {"weights_bytes": params + live, "twin_bytes": 0,
                "prepared_bytes": prep.prepared_bytes() if prep is not None else 0,
                "kv_resident_bytes": backing.resident_bytes() if kv_resident and backing is not None else None,
                **process_rss()}

    def morphserve_drop_page_cache(self) -> dict:
        """Evict the model's and the pack's file pages, so the next transition reads cold."""
        self._masters.drop_page_cache()
        self._twins.drop_page_cache()
        return {"files": len(self._masters.files()) + len(self._twins.files())}

    # -- KV resizing ------------------------------------------------------------------
    def morphserve_kv_release(self, first_block: int, last_block: int) -> dict:
        """Hand back the memory of blocks first_block..last_block (already hidden, all free)."""
        backing = vp.host_kv_backing()
        if backing is None:
            return {"advised": 0, "rss_delta": 0, "backing": "none"}
        rss_before = rss_bytes()
        maybe_fail("kv_release")
        ranges = tail_ranges(self.model_runner.kv_cache_config.kv_cache_tensors, first_block, last_block)
        advised = backing.release(ranges)
        return {"advised": advised, "rss_delta": rss_before - rss_bytes(), "backing": "host-mmap"}

    def morphserve_kv_migrate(self, pairs: list[tuple[int, int]]) -> dict:
        """Copy KV blocks src -> dst in every layer and rewrite this worker's block tables."""
        t0 = time.monotonic()
        vp.copy_kv_blocks(self.model_runner, pairs)
        vp.remap_worker_block_tables(self.model_runner, dict(pairs))
        return {"moved": len(pairs), "seconds": time.monotonic() - t0}

    def morphserve_quantized(self) -> list[int]:
        return sorted(i for i, swaps in self._morph_layers.items() if all(s.quantized for s in swaps))

    def morphserve_rss(self) -> int:
        _trim_heap()
        return rss_bytes()

