"""Worker side of MorphServe: added to vLLM's worker class via `worker_extension_cls`.

The engine core calls these methods by name through `collective_rpc` at step boundaries
(never with pickled callables). Arguments and results are plain lists and dicts.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch
from safetensors import safe_open

from morphserve import pack as packfmt
from morphserve import vllm_patches as vp
from kv_resize.host_backing import tail_ranges
from quant_layers.model_info import read_model_info
from quant_layers.swappable import IdentityCompute, PackedShard, SwappableLinear, W4Compute
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
        """Load the pack's twin for every decoder layer and keep bf16 masters outside the layers."""
        t0 = time.monotonic()
        pack_dir = Path(cfg["pack"])
        manifest = packfmt.load_manifest(pack_dir)
        model_path = Path(self.vllm_config.model_config.model)
        info = read_model_info(model_path)
        twin = open_twin(pack_dir / manifest.quantized_dir, info)
        dtype = self.vllm_config.model_config.dtype
        fp_index = index_safetensors(model_path)
        layers = vp.decoder_layers(self.model_runner.model)
        self._morph_layers = {}
        vp.enable_host_kv_backing()  # the KV cache is allocated after this call
        for i in range(manifest.num_layers):
            block = layers[i]
            swaps = []
            for vllm_name, hf_names in vp.FUSED_LINEARS:
                keys = [f"model.layers.{i}.{n}" for n in hf_names]
                master = torch.cat([_read(fp_index, f"{k}.weight") for k in keys], 0).to(dtype).contiguous()
                if cfg.get("twin") == "identity":
                    compute = IdentityCompute(master)
                else:
                    shards = [PackedShard(_read(twin.tensors, f"{k}.weight_packed"),
                                          _read(twin.tensors, f"{k}.weight_scale")) for k in keys]
                    compute = W4Compute(shards, master.shape[1], twin.group_size, dtype)
                swaps.append(SwappableLinear(block.get_submodule(vllm_name), master, compute))
            self._morph_layers[i] = swaps
        _trim_heap()
        return {"layers": len(self._morph_layers), "seconds": time.monotonic() - t0, "rss": rss_bytes()}

    def morphserve_apply(self, quantize: list[int], restore: list[int]) -> dict:
        """Quantize then restore the given layers; report the bytes and the time it took."""
        t0 = time.monotonic()
        _trim_heap()  # so the RSS delta below is this swap's, not earlier frees'
        rss_before = rss_bytes()
        freed = 0
        changed: list[SwappableLinear] = []
        try:
            for i in restore:
                for s in self._morph_layers[i]:
                    if s.quantized:
                        s.to_full()
                        changed.append(s)
                        freed -= s.fp_bytes
            for i in quantize:
                for s in self._morph_layers[i]:
                    if not s.quantized:
                        s.to_quantized()
                        changed.append(s)
                        freed += s.fp_bytes
        except Exception:
            # Undo this call's swaps so every layer is wholly in one state again.
            for s in reversed(changed):
                s.to_full() if s.quantized else s.to_quantized()
            raise
        _trim_heap()
        return {"fp_bytes_freed": freed, "rss_delta": rss_before - rss_bytes(),
                "seconds": time.monotonic() - t0, "quantized": self.morphserve_quantized()}

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


def _read(index: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(index[key], "pt") as f:
        return f.get_tensor(key)
