"""The worker's swappable layers: every fused linear of every decoder layer, switched
between bf16 and its twins (W4A16; W8A8 too in a tiered pack), a layer wholly in one
tier at a time, at the step boundaries the controller chooses. Plain torch over quant_layers; the vLLM worker extension
(morphserve.vllm.worker_ext) builds it from the model runner and calls it by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from pathlib import Path
from typing import Callable

import torch

from morphserve.offline import pack as packfmt
from morphserve.runtime.config import MorphConfig
from morphserve.runtime.faults import maybe_fail
from quant_layers.cache_dir import cache_root
from quant_layers.fused_masters import open_fused_masters
from quant_layers.kernel_twins import cache_key, ensure_kernel_twins, kernel_attrs
from quant_layers.mapped_checkpoint import MappedCheckpoint
from quant_layers.model_info import read_model_info
from quant_layers.restore_prep import LayerCost, RestorePreparer, release_computes
from quant_layers.swappable import (TIER_RANK, IdentityTwin, LinearKernels, PackedShard, ProofFailed, Readers,
                                    SwappableLinear, W4Twin, W8Twin, process_for_kernel)
from quant_layers.twin import index_safetensors, open_twin
from quant_layers.w8_twin import open_w8_twin

FULL = SwappableLinear.FULL
TRIM_EVERY_BYTES = 32 << 20


def _change(item, default_tier: str) -> tuple[int, str]:
    """A transition entry: a layer id (to `default_tier`) or [layer, tier]."""
    if isinstance(item, (list, tuple)):
        return int(item[0]), str(item[1])
    return int(item), default_tier


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
    def __init__(self, layers: dict[int, list[SwappableLinear]], masters: MappedCheckpoint, twins: MappedCheckpoint,
                 w8: MappedCheckpoint | None = None, fused: MappedCheckpoint | None = None):
        self.layers = layers
        self.masters = masters
        self.twins = twins
        self.w8 = w8
        self.fused = fused
        self.restore: RestorePreparer | None = None
        self.finishing: list[RestorePreparer] = []  # cancelled, a thread still ending one layer
        self.restore_targets: dict[int, str] = {}

    @contextlib.contextmanager
    def _readers(self):
        with contextlib.ExitStack() as stack:
            masters = stack.enter_context(self.masters.reading())
            twins = stack.enter_context(self.twins.reading())
            w8 = stack.enter_context(self.w8.reading()) if self.w8 is not None else None
            fused = stack.enter_context(self.fused.reading()) if self.fused is not None else None
            yield Readers(masters, twins, w8, fused)

    @classmethod
    def build(cls, config: MorphConfig, model_path: Path, dtype: torch.dtype, decoder_layers, fused_linears,
              kernels: LinearKernels, twin_cache_tag: tuple[str, str], cutter_for: Callable,
              rank: tuple[int, int] = (0, 1)) -> "LayerSet":
        """Attach a SwappableLinear to every fused linear of every decoder layer.

        Nothing is kept in RAM: the bf16 masters stay in the model's safetensors files and
        the W4 twins, once put in the kernel's layout, in a cache file (kernel_twins); both
        are read through read-only maps when a layer changes precision. Opening the twin
        checks it against the model (shapes, every tensor). `fused_linears` is the engine's
        (module path, HF names) per fused linear; `twin_cache_tag` (engine version, kernel
        variant) keys the kernel-layout cache. `cutter_for(module, parts)` gives the Cutter
        that cuts a linear's tensors to what this rank computes with; `rank` is (this
        worker's tensor-parallel rank, world size): each rank builds and caches its own shards.
        """
        pack_dir = Path(config.pack)
        manifest = packfmt.load_manifest(pack_dir)
        info = read_model_info(model_path)
        served = config.tiers if config.tiers is not None else manifest.tier_names
        # Only the tiers this CPU serves are opened: on a CPU without vLLM's W4A16 kernel
        # not even the kernel-layout twin file is built (building it runs that kernel's code).
        w4_tier = manifest.tier(packfmt.BASE_TIER) if packfmt.BASE_TIER in served else None
        w8_tier = manifest.tier("w8a8") if "w8a8" in served else None
        twin_ckpt = open_twin(pack_dir / w4_tier.quantized_dir, info) if w4_tier is not None else None
        w8_ckpt = open_w8_twin(pack_dir / w8_tier.quantized_dir, info) if w8_tier is not None else None
        masters = MappedCheckpoint(index_safetensors(model_path))
        elem = torch.empty(0, dtype=dtype).element_size()
        identity = config.twin == "identity"
        fused = {f"layers.{i}.{vllm_name}": (i, vllm_name, hf_names)
                 for i in range(manifest.num_layers) for vllm_name, hf_names in fused_linears}
        cutters = {name: cutter_for(decoder_layers[i].get_submodule(vllm_name), len(hf_names))
                   for name, (i, vllm_name, hf_names) in fused.items()}
        rank_tag = [f"tp{rank[0]}of{rank[1]}"] if rank[1] > 1 else []
        for i, _, hf_names in fused.values():
            missing = [n for n in hf_names if f"model.layers.{i}.{n}.weight" not in masters.index]
            if missing:
                raise RuntimeError(f"model checkpoint {model_path} lacks model.layers.{i}.{missing[0]}.weight")

        def kernel_layout(name: str):
            i, _, hf_names = fused[name]
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            cut, group = cutters[name], twin_ckpt.group_size
            with MappedCheckpoint(twin_ckpt.tensors).reading() as pack:
                shard = PackedShard(cut.cut([pack.get(f"{k}.weight_packed") for k in keys], 8),
                                    cut.cut([pack.get(f"{k}.weight_scale") for k in keys], group))
                tensors, attrs = process_for_kernel([shard], cut.in_features, group, dtype, kernels)
            return tensors, {**attrs, "params": sorted(tensors)}

        w4_bytes: dict[str, int] = {}
        if identity or twin_ckpt is None:
            twins, attrs = MappedCheckpoint({}), {}
        else:
            pack_files = sorted(set(twin_ckpt.tensors.values()))
            engine_version, variant = twin_cache_tag
            key = cache_key(pack_files, engine_version, str(dtype), variant, *rank_tag)
            path = cache_root() / "kernel-twins" / f"{key}.safetensors"
            twins = ensure_kernel_twins(path, list(fused), kernel_layout)
            attrs = kernel_attrs(path)
        with twins.reading() as r:  # what each linear's W4 compute will hold (maps: no copy)
            w4_bytes = {name: sum(r.get(f"{name}.{p}").nbytes for p in attrs[name]["params"]) for name in attrs}
        fused_masters = open_fused_masters(masters, model_path, dtype, fused, cutters, rank)
        layers: dict[int, list[SwappableLinear]] = {}
        for name, (i, vllm_name, hf_names) in fused.items():
            cut = cutters[name]
            in_features, out_features = cut.in_features, cut.out_features  # this rank's
            tiers = {}
            if w8_ckpt is not None:
                tiers["w8a8"] = IdentityTwin(kernels, cut, name) if identity else W8Twin(kernels, cut)
            if twin_ckpt is not None:
                tiers[packfmt.BASE_TIER] = IdentityTwin(kernels, cut, name) if identity else W4Twin(
                    name, in_features, out_features, twin_ckpt.group_size, dtype, attrs[name], kernels)
            keys = [f"model.layers.{i}.{n}" for n in hf_names]
            swap = SwappableLinear(decoder_layers[i].get_submodule(vllm_name), keys, tiers,
                                   out_features * in_features * elem, kernels, (in_features, out_features), dtype,
                                   name=name)
            swap.fault = maybe_fail
            if not identity:  # an identity twin holds bf16: a move to it frees nothing
                swap.tier_bytes["w8a8"] = kernels.w8_bytes(out_features, in_features)
            if name in w4_bytes:
                swap.tier_bytes[packfmt.BASE_TIER] = w4_bytes[name]
            layers.setdefault(i, []).append(swap)
        built = cls(layers, masters, twins, MappedCheckpoint(w8_ckpt.tensors) if w8_ckpt is not None else None,
                    fused_masters)
        if config.prompt_twin_layers:
            if identity or list(served) != ["w8a8"]:
                raise RuntimeError(f"prompt_twin_layers needs a W8A8-only ladder of pack twins (serving {served}"
                                   f"{', identity twins' if identity else ''}): a layer quantized further would "
                                   "keep its W8A8 prompt twin resident beside its W4A16 compute")
            built.hold_prompt_twins(manifest.tier("w8a8").swap_order, config.prompt_twin_layers,
                                    config.prompt_twin_min_tokens)
        return built

    def hold_prompt_twins(self, order: list[int], count: int, min_tokens: int) -> None:
        """Build the W8A8 twins of the first `count` layers of the quantization order (those
        a move up quantizes first) and keep them resident as prompt twins (SwappableLinear.
        hold_prompt_twin), one layer at a time, each proved as a swap proves it."""
        if count > len(order):
            raise RuntimeError(f"prompt_twin_layers {count} is more than the model's {len(order)} layers")
        for i in order[:count]:
            with self._readers() as readers:
                computes = [s.prepare("w8a8", readers) for s in self.layers[i]]
            for s, compute in zip(self.layers[i], computes):
                s.hold_prompt_twin("w8a8", compute, min_tokens)
        trim_heap()

    def prompt_twin_bytes(self) -> int:
        """Bytes of the resident prompt twins (held at every level: a quantized twinned layer
        computes with its twin)."""
        return sum(s.resident_twin_bytes for s in self.all_linears())

    @property
    def default_tier(self) -> str:
        """Where a plain layer id goes when quantized: the most compressed tier served."""
        return next(iter(self.layers.values()))[0].most_compressed

    def apply(self, quantize: list, restore: list) -> dict:
        """Restore then quantize the given layers (a layer id, or [layer, tier]: a plain id
        quantizes to the most compressed tier served and restores to bf16); report the
        bytes and time.

        Each layer changes whole: the new computes of all its linears are built (and
        proved) before any is installed, then installed together (pointer swaps). A failure
        while building drops what was built, so the layer is as it was, and the rollback
        reads no file (the old way re-read the masters, and a failed read left a layer's
        linears in two tiers). Layers this call finished before the failure keep their new
        tier, each whole; the caller takes the map from `tiers()`."""
        t0 = time.monotonic()
        rss_before = rss_bytes()  # a call that frees anything ends trimmed, so this delta is its own
        freed = gross = 0  # net bytes (old - new precision) and bf16 bytes
        moves = ([_change(x, FULL) for x in restore], "restore"), ([_change(x, self.default_tier) for x in quantize],
                                                                   "quantize")
        unreturned = 0  # bytes of old computes freed since the heap was last trimmed
        for batch, fault in moves:
            for i, tier in batch:
                swaps = [s for s in self.layers[i] if s.tier != tier]
                built: list = []
                # The files are mapped for one layer at a time, and the heap is trimmed
                # every TRIM_EVERY_BYTES freed: a transition's RSS then peaks a few layers
                # above where it starts or ends, not at every page it read and every buffer
                # it freed (measured, 0 -> 30 W8A8 and back: +181 and +347 MiB over the
                # worker's RSS before and after when the maps stayed open and the heap was
                # trimmed once at the end; trimming after every layer costs 8 ms a layer).
                with self._readers() as readers:
                    try:
                        for s in swaps:
                            built.append(s.prepare(tier, readers))
                            maybe_fail(fault)  # inside the layer's swap: part built, nothing installed
                    except BaseException:
                        release_computes(built)
                        raise
                for s, compute in zip(swaps, built):
                    before, was = s.live_bytes, s.tier
                    s.commit(tier, compute)
                    freed += before - s.live_bytes
                    gross += s.fp_bytes * ((was == FULL) - (tier == FULL))
                    unreturned += before
                if unreturned >= TRIM_EVERY_BYTES:
                    trim_heap()
                    unreturned = 0
        if unreturned:
            trim_heap()
        return {"fp_bytes_freed": gross, "bytes_freed": freed, "rss_delta": rss_before - rss_bytes(),
                "seconds": time.monotonic() - t0, "quantized": self.quantized(), "tiers": self.tiers()}

    def set_tiers(self, target: dict[int, str]) -> dict:
        """Bring every layer to its tier in `target` (bf16 where absent), each layer whole
        (apply: the less compressed moves first, then the more compressed)."""
        changes = [(i, target.get(i, FULL)) for i in sorted(self.layers)
                   if self.layers[i][0].tier != target.get(i, FULL)]
        up = [[i, t] for i, t in changes if TIER_RANK[t] > TIER_RANK[self.layers[i][0].tier]]
        down = [[i, t] for i, t in changes if TIER_RANK[t] < TIER_RANK[self.layers[i][0].tier]]
        return self.apply(up, down)

    def all_linears(self) -> list[SwappableLinear]:
        return [s for swaps in self.layers.values() for s in swaps]

    def split_layers(self) -> list[int]:
        """Layers whose linears compute in more than one tier (must always be empty)."""
        return sorted(i for i, swaps in self.layers.items() if len({s.tier for s in swaps}) > 1)

    # -- moves prepared in the background (named for restores, their first use) ---------
    def restore_begin(self, layers: list) -> dict:
        """Start preparing these layers' new tier in a thread (a layer id: bf16, or
        [layer, tier], either way: a restore or a compression); nothing changes yet."""
        self.restore_cancel()
        swaps = self.layers
        targets = dict(_change(x, FULL) for x in layers)
        # A resident prompt twin is held before and after: neither side counts it, so what a
        # layer's preparation allocates (new_bytes) is exact (nothing, for a move to the twin).
        costs = {i: LayerCost(sum(s.tier_bytes.get(t, s.fp_bytes) - s.resident_twin_bytes for s in swaps[i]),
                              sum(s.live_bytes - s.resident_twin_bytes for s in swaps[i])) for i, t in targets.items()}

        def prepare(i: int) -> list:
            # Built here, proved at commit on the engine's thread: vLLM's CPU kernels are not
            # safe to run from two threads at once (measured: a proof call made here while
            # the forward ran returned non-finite values from a sound compute).
            with self._readers() as readers:
                return [s.prepare(targets[i], readers, prove=False) if s.tier != targets[i] else None
                        for s in swaps[i]]

        # One intra-op thread for the preparer (torch's setting is per thread): the forward
        # pass keeps all of its threads and the two contend for one core, not all of them.
        self.restore = RestorePreparer(list(targets), costs, prepare, thread_init=lambda: torch.set_num_threads(1))
        self.restore_targets = targets
        return {"started": len(targets)}

    def restore_ready(self) -> int:
        """Layers the restore could install now, in its order (0 when none is under way)."""
        return self.restore.ready_count() if self.restore is not None else 0

    def restore_commit(self, limit: int | None = None) -> dict:
        """Install the layers prepared so far, at most `limit` of them in restore order
        (called at a step boundary; under tensor parallelism the engine passes the count
        every rank has ready, so all ranks install the same layers)."""
        prep = self.restore
        if prep is None:
            return {"active": False, "committed": [], "done": True, "error": None,
                    "quantized": self.quantized(), "tiers": self.tiers()}
        committed, fp_bytes, failed = [], 0, None
        taken = prep.take_ready(limit)
        for n, (i, computes) in enumerate(taken):
            tier = self.restore_targets[i]
            try:
                for s, compute in zip(self.layers[i], computes):
                    if compute is not None and tier != FULL:
                        s.prove(compute, release_on_failure=False)
            except ProofFailed as e:  # the layer stays as it was, and so do those after it
                release_computes([c for _, cs in taken[n:] for c in cs if c is not None])
                failed = e
                break
            for s, compute in zip(self.layers[i], computes):
                if compute is not None:
                    fp_bytes += s.fp_bytes if tier == FULL else 0
                    s.commit(tier, compute)
            committed.append(i)
            maybe_fail("restore_commit")  # this layer is installed whole; the rest stay as they were
        error = repr(failed or prep.error) if (failed or prep.error) is not None else None
        done = prep.remaining == 0
        if done or error:
            self._drop(prep)
        if committed:
            trim_heap()
        return {"active": True, "committed": committed, "fp_bytes_restored": fp_bytes, "done": done,
                "error": error, "quantized": self.quantized(), "tiers": self.tiers()}

    def restore_cancel(self) -> dict:
        """Drop a restore in progress; layers already installed keep their new precision."""
        prep = self.restore
        if prep is not None:
            self._drop(prep)
            trim_heap()
        return {"quantized": self.quantized(), "tiers": self.tiers()}

    def _drop(self, prep: RestorePreparer) -> None:
        prep.cancel()  # never waits for the thread: this runs on the engine's thread
        self.restore = None
        self.finishing = [p for p in self.finishing if not p.finished] + ([] if prep.finished else [prep])

    def drop_page_cache(self) -> dict:
        """Evict the model's and the pack's file pages, so the next transition reads cold."""
        maps = [m for m in (self.masters, self.twins, self.w8, self.fused) if m is not None]
        for m in maps:
            m.drop_page_cache()
        return {"files": sum(len(m.files()) for m in maps)}

    def held_tier_bytes(self, every_tier: bool = False) -> dict[str, list[int]]:
        """Per layer, the bytes each served int8 tier holds as the kernel keeps it (the pack's
        manifest counts the checkpoint; vLLM's oneDNN int8 path adds a buffer per linear).
        `every_tier`: bf16 and every served tier, as this rank holds them (under tensor
        parallelism a rank holds a shard, so the manifest's whole-layer bytes do not apply)."""
        swaps = self.layers[next(iter(self.layers))]
        tiers = ([SwappableLinear.FULL] + list(swaps[0].twins)) if every_tier else [
            t for t in ("w8a8",) if t in swaps[0].twins]
        known = [t for t in tiers if all(t in s.tier_bytes for s in self.all_linears())]  # identity twins hold none
        return {t: [sum(s.tier_bytes[t] for s in self.layers[i]) for i in sorted(self.layers)] for t in known}

    def quantized(self) -> list[int]:
        return sorted(i for i, swaps in self.layers.items() if all(s.quantized for s in swaps))

    def tiers(self) -> dict[str, str]:
        """layer -> tier of every layer not in bf16 (JSON keys: strings)."""
        return {str(i): swaps[0].tier for i, swaps in sorted(self.layers.items()) if swaps[0].tier != FULL}

    def live_bytes(self) -> int:
        """Bytes of the swappable linears' weights as they compute now (bf16 or W4)."""
        return sum(s.live_bytes for swaps in self.layers.values() for s in swaps)

    def finishing_restores(self) -> int:
        """Cancelled restores whose thread is still ending its last layer."""
        self.finishing = [p for p in self.finishing if not p.finished]
        return len(self.finishing)

    def prepared_bytes(self) -> int:
        """bf16 layers a background restore has prepared and not yet installed."""
        self.finishing = [p for p in self.finishing if not p.finished]
        active = [self.restore] if self.restore is not None else []
        return sum(p.prepared_bytes() for p in active + self.finishing)
