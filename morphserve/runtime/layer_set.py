"""The worker's swappable layers: every fused linear of every decoder layer, switched
between bf16 and its W4 twin, wholly or not at all, at the step boundaries the
controller chooses. Plain torch over quant_layers; the vLLM worker extension
(morphserve.vllm.worker_ext) builds it from the model runner and calls it by name.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import torch

from morphserve.offline import pack as packfmt
from morphserve.runtime.config import MorphConfig
from morphserve.runtime.faults import maybe_fail
from quant_layers.cache_dir import cache_root
from quant_layers.kernel_twins import cache_key, ensure_kernel_twins, kernel_attrs
from quant_layers.mapped_checkpoint import MappedCheckpoint
from quant_layers.model_info import read_model_info
from quant_layers.restore_prep import LayerCost, RestorePreparer
from quant_layers.swappable import (IdentityTwin, LinearKernels, PackedShard, Readers, SwappableLinear, W4Twin,
                                    process_for_kernel)
from quant_layers.twin import index_safetensors, open_twin


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim_heap() -> None:
    """Hand freed heap pages back to the OS so RSS reflects what a swap released."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LayerSet:
    def __init__(self, layers: dict[int, list[SwappableLinear]], masters: MappedCheckpoint, twins: MappedCheckpoint):
        self.layers = layers
        self.masters = masters
        self.twins = twins
        self.restore: RestorePreparer | None = None

    @classmethod
    def build(cls, config: MorphConfig, model_path: Path, dtype: torch.dtype, decoder_layers, fused_linears,
              kernels: LinearKernels, twin_cache_tag: tuple[str, str]) -> "LayerSet":
        """Attach a SwappableLinear to every fused linear of every decoder layer.

        Nothing is kept in RAM: the bf16 masters stay in the model's safetensors files and
        the W4 twins, once put in the kernel's layout, in a cache file (kernel_twins); both
        are read through read-only maps when a layer changes precision. Opening the twin
        checks it against the model (shapes, every tensor). `fused_linears` is the engine's
        (module path, HF names) per fused linear; `twin_cache_tag` (engine version, kernel
        variant) keys the kernel-layout cache.
        """
        pack_dir = Path(config.pack)
        manifest = packfmt.load_manifest(pack_dir)
        info = read_model_info(model_path)
        twin_ckpt = open_twin(pack_dir / manifest.quantized_dir, info)
        masters = MappedCheckpoint(index_safetensors(model_path))
        elem = torch.empty(0, dtype=dtype).element_size()
        identity = config.twin == "identity"
        fused = {f"layers.{i}.{vllm_name}": (i, vllm_name, hf_names)
                 for i in range(manifest.num_layers) for vllm_name, hf_names in fused_linears}
        for i, _, hf_names in fused.values():
            missing = [n for n in hf_names if f"model.layers.{i}.{n}.weight" not in masters.index]
            if missing:
                raise RuntimeError(f"model checkpoint {model_path} lacks model.layers.{i}.{missing[0]}.weight")

        def kernel_layout(name: str):
            i, _, hf_names = fused[name]
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            with MappedCheckpoint(twin_ckpt.tensors).reading() as pack:
                shards = [PackedShard(pack.get(f"{k}.weight_packed"), pack.get(f"{k}.weight_scale")) for k in keys]
                tensors, attrs = process_for_kernel(shards, info.linear_shapes[hf_names[0]][1],
                                                    twin_ckpt.group_size, dtype, kernels)
            return tensors, {**attrs, "params": sorted(tensors)}

        if identity:
            twins, attrs = MappedCheckpoint({}), {}
        else:
            pack_files = sorted(set(twin_ckpt.tensors.values()))
            engine_version, variant = twin_cache_tag
            key = cache_key(pack_files, engine_version, str(dtype), variant)
            path = cache_root() / "kernel-twins" / f"{key}.safetensors"
            twins = ensure_kernel_twins(path, list(fused), kernel_layout)
            attrs = kernel_attrs(path)
        layers: dict[int, list[SwappableLinear]] = {}
        for name, (i, vllm_name, hf_names) in fused.items():
            in_features = info.linear_shapes[hf_names[0]][1]
            out_features = sum(info.linear_shapes[n][0] for n in hf_names)
            twin = IdentityTwin(kernels) if identity else W4Twin(name, in_features, out_features,
                                                                  twin_ckpt.group_size, dtype, attrs[name], kernels)
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            swap = SwappableLinear(decoder_layers[i].get_submodule(vllm_name), keys, twin,
                                   out_features * in_features * elem, kernels)
            layers.setdefault(i, []).append(swap)
        return cls(layers, masters, twins)

    def apply(self, quantize: list[int], restore: list[int]) -> dict:
        """Quantize then restore the given layers; report the bytes and the time it took."""
        t0 = time.monotonic()
        rss_before = rss_bytes()  # every call ends trimmed, so this delta is this call's
        freed = gross = 0  # net bytes (bf16 - W4) and bf16 bytes
        changed: list[SwappableLinear] = []
        with self.masters.reading() as masters, self.twins.reading() as twins:
            readers = Readers(masters, twins)
            try:
                for i in restore:
                    for s in self.layers[i]:
                        if s.quantized:
                            freed -= s.fp_bytes - s.live_bytes
                            gross -= s.fp_bytes
                            s.to_full(readers)
                            changed.append(s)
                            maybe_fail("restore")
                for i in quantize:
                    for s in self.layers[i]:
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
        trim_heap()
        return {"fp_bytes_freed": gross, "bytes_freed": freed, "rss_delta": rss_before - rss_bytes(),
                "seconds": time.monotonic() - t0, "quantized": self.quantized()}

    # -- restores prepared in the background ------------------------------------------
    def restore_begin(self, layers: list[int]) -> dict:
        """Start preparing these layers' bf16 prepacks in a thread; nothing changes yet."""
        self.restore_cancel()
        swaps = self.layers
        costs = {i: LayerCost(sum(s.fp_bytes for s in swaps[i]), sum(s.live_bytes for s in swaps[i])) for i in layers}

        def prepare(i: int) -> list:
            with self.masters.reading() as masters, self.twins.reading() as twins:
                readers = Readers(masters, twins)
                return [s.prepare_full(readers) if s.quantized else None for s in swaps[i]]

        # One intra-op thread for the preparer (torch's setting is per thread): the forward
        # pass keeps all of its threads and the two contend for one core, not all of them.
        self.restore = RestorePreparer(layers, costs, prepare, thread_init=lambda: torch.set_num_threads(1))
        return {"started": len(layers)}

    def restore_commit(self) -> dict:
        """Install every layer prepared so far (called at a step boundary)."""
        prep = self.restore
        if prep is None:
            return {"active": False, "committed": [], "done": True, "error": None,
                    "quantized": self.quantized()}
        committed, fp_bytes = [], 0
        for i, closures in prep.take_ready():
            for s, closure in zip(self.layers[i], closures):
                if closure is not None:
                    fp_bytes += s.fp_bytes
                    s.commit_full(closure)
            committed.append(i)
            maybe_fail("restore_commit")  # this layer is installed whole; the rest stay W4
        error = repr(prep.error) if prep.error is not None else None
        done = prep.remaining == 0
        if done or error:
            prep.cancel()
            self.restore = None
        if committed:
            trim_heap()
        return {"active": True, "committed": committed, "fp_bytes_restored": fp_bytes, "done": done,
                "error": error, "quantized": self.quantized()}

    def restore_cancel(self) -> dict:
        """Drop a restore in progress; layers already installed stay bf16."""
        prep = self.restore
        if prep is not None:
            prep.cancel()
            self.restore = None
            trim_heap()
        return {"quantized": self.quantized()}

    def drop_page_cache(self) -> dict:
        """Evict the model's and the pack's file pages, so the next transition reads cold."""
        self.masters.drop_page_cache()
        self.twins.drop_page_cache()
        return {"files": len(self.masters.files()) + len(self.twins.files())}

    def quantized(self) -> list[int]:
        return sorted(i for i, swaps in self.layers.items() if all(s.quantized for s in swaps))

    def live_bytes(self) -> int:
        """Bytes of the swappable linears' weights as they compute now (bf16 or W4)."""
        return sum(s.live_bytes for swaps in self.layers.values() for s in swaps)

    def prepared_bytes(self) -> int:
        """bf16 layers a background restore has prepared and not yet installed."""
        return self.restore.prepared_bytes() if self.restore is not None else 0
