"""Worker side of MorphServe: added to vLLM's worker class via `worker_extension_cls`.

The engine core calls these methods by name through `collective_rpc` at step boundaries
(never with pickled callables). Arguments and results are plain lists and dicts.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

from morphserve import pack as packfmt
from morphserve import vllm_patches as vp
from kv_resize.host_backing import tail_ranges
from quant_layers.model_info import read_model_info
from quant_layers.mapped_checkpoint import MappedCheckpoint
from quant_layers.swappable import IdentityTwin, Readers, SwappableLinear, W4Twin
from quant_layers.twin import index_safetensors, open_twin


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def rss_split() -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of this process, in bytes (from /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return {"rss_anon_bytes": out.get("RssAnon", 0), "rss_file_bytes": out.get("RssFile", 0),
            "rss_shmem_bytes": out.get("RssShmem", 0)}


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

        Nothing is copied: the bf16 masters stay in the model's safetensors files and the
        W4 twins in the pack's, both read through read-only maps when a layer changes
        precision. Opening the twin checks it against the model (shapes, every tensor).
        """
        t0 = time.monotonic()
        pack_dir = Path(cfg["pack"])
        manifest = packfmt.load_manifest(pack_dir)
        model_path = Path(self.vllm_config.model_config.model)
        info = read_model_info(model_path)
        twin_ckpt = open_twin(pack_dir / manifest.quantized_dir, info)
        dtype = self.vllm_config.model_config.dtype
        self._masters = MappedCheckpoint(index_safetensors(model_path))
        self._twins = MappedCheckpoint(twin_ckpt.tensors)
        layers = vp.decoder_layers(self.model_runner.model)
        elem = torch.empty(0, dtype=dtype).element_size()
        self._morph_layers = {}
        vp.enable_host_kv_backing()  # the KV cache is allocated after this call
        for i in range(manifest.num_layers):
            block = layers[i]
            swaps = []
            for vllm_name, hf_names in vp.FUSED_LINEARS:
                keys = [f"model.layers.{i}.{n}" for n in hf_names]
                missing = [k for k in keys if f"{k}.weight" not in self._masters.index]
                if missing:
                    raise RuntimeError(f"model checkpoint {model_path} lacks {missing[0]}.weight")
                in_features = info.linear_shapes[hf_names[0]][1]
                fp_bytes = sum(info.linear_shapes[n][0] for n in hf_names) * in_features * elem
                twin = IdentityTwin() if cfg.get("twin") == "identity" else W4Twin(
                    in_features, twin_ckpt.group_size, dtype)
                swaps.append(SwappableLinear(block.get_submodule(vllm_name), keys, twin, fp_bytes))
            self._morph_layers[i] = swaps
        _trim_heap()
        return {"layers": len(self._morph_layers), "seconds": time.monotonic() - t0, "rss": rss_bytes()}

    def morphserve_apply(self, quantize: list[int], restore: list[int]) -> dict:
        """Quantize then restore the given layers; report the bytes and the time it took."""
        t0 = time.monotonic()
        _trim_heap()  # so the RSS delta below is this swap's, not earlier frees'
        rss_before = rss_bytes()
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
                for i in quantize:
                    for s in self._morph_layers[i]:
                        if not s.quantized:
                            s.to_quantized(readers)
                            changed.append(s)
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

    def morphserve_memory(self) -> dict:
        """What this worker holds: weights the model computes with (in whichever precision),
        twins resident outside the model (none: they stay in the pack file), and its RSS."""
        _trim_heap()
        params = sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters())
        live = sum(s.live_bytes for swaps in self._morph_layers.values() for s in swaps)
        return {"weights_bytes": params + live, "twin_bytes": 0, **rss_split()}

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

