"""Worker side of MorphServe: added to vLLM's worker class via `worker_extension_cls`.

The engine core calls these methods by name through `collective_rpc` at step boundaries
(never with pickled callables). Arguments and results are plain lists and dicts. This
mixin only reads what it needs from vLLM's worker (the model, its dtype and path, the KV
cache) and hands it to the runtime's LayerSet, which holds the swap logic.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from kv_resize.host_backing import tail_ranges
from morphserve.runtime import faults
from morphserve.runtime.faults import maybe_fail
from morphserve.runtime.config import MorphConfig
from morphserve.runtime.heap_trimmer import HeapTrimmer
from morphserve.runtime.layer_set import LayerSet, rss_bytes, trim_heap
from morphserve.runtime.proc_memory import process_rss
from morphserve.vllm import kernels, kv_cache, shards
from morphserve.vllm.backends import backend_for
from morphserve.vllm.patches import SUPPORTED_VLLM
from vllm.config import CompilationMode


# A worker method that raises under vLLM's multiprocess executor breaks every later call:
# collective_rpc raises at the first failed rank's reply and leaves the other ranks'
# replies unread in their queues, where the next call would read them as its own. So no
# MorphServe method raises across the boundary: a failure comes back as this key, every
# rank's reply is read, and the engine side (morphserve.vllm.engine) raises once.
ERROR_KEY = "morphserve_error"


def _reported(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            return {ERROR_KEY: f"{type(e).__name__}: {e}", "rank": faults.rank()}

    return call


def _every_failure_reported(cls):
    for name, value in list(vars(cls).items()):
        if name.startswith("morphserve_") and callable(value):
            setattr(cls, name, _reported(value))
    return cls


@_every_failure_reported
class MorphWorkerExtension:
    _morph: LayerSet

    def morphserve_init(self, cfg: dict) -> dict:
        t0 = time.monotonic()
        config = MorphConfig.model_validate(cfg)
        dtype = self.vllm_config.model_config.dtype
        # vLLM's own verdict (enforce_eager sets the mode to NONE): a compiled engine traces the
        # model after this call, so the linears must already call their slots
        compiled = self.vllm_config.compilation_config.mode != CompilationMode.NONE
        backend = backend_for(self.device.type, kv_huge_pages=config.kv_huge_pages == "on", compiled=compiled)
        variant = kernels.wna16_variant(dtype) if backend.name == "cpu" else backend.name
        layers = kernels.decoder_layers(self.model_runner.model)
        rank = self._tensor_parallel()
        faults.set_rank(rank[0])
        self._morph = LayerSet.build(
            config, Path(self.vllm_config.model_config.model), dtype,
            layers, kernels.FUSED_LINEARS, backend.kernels, (SUPPORTED_VLLM, variant), shards.RankCutter, rank)
        kv_cache.enable_kv_backing(backend)  # the KV cache is allocated after this call
        trim_heap()
        self._trimmer = HeapTrimmer(config.heap_trim_interval_s,
                                    min_growth_bytes=int(config.heap_trim_min_growth_mb * 2**20),
                                    mode=config.heap_trim_mode)
        self._trimmer.start()  # a thread only in mode "thread"; "boundary" waits for morphserve_trim_heap
        sharded = rank[1] > 1
        # The pack's manifest counts bf16 layers; an engine in another dtype (fp32 where bf16
        # is emulated) holds other bytes, as a rank's shard does, so every tier is reported.
        # Resident prompt twins make a layer's full precision hold more than the manifest's bytes.
        every_tier = sharded or dtype.itemsize != 2 or self._morph.prompt_twin_bytes() > 0
        return {"layers": len(self._morph.layers), "seconds": time.monotonic() - t0, "rss": rss_bytes(), "compiled": compiled,
                "backend": backend.name, "commits_on_touch": backend.commits_on_touch, "rank": rank[0],
                "ranks": rank[1], "held_tier_bytes": self._morph.held_tier_bytes(every_tier=every_tier),
                "prompt_twin_bytes": self._morph.prompt_twin_bytes(),
                "heap_trim_available": self._trimmer.available,  # False under a preloaded allocator
                # where vLLM bound this worker (its OpenMP threads run on these cores)
                "pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)),
                # this rank's weights at full precision: its shard of every linear, its
                # embedding rows, and the norms every rank holds (a shard's bytes, not the file's)
                "weight_bytes": self._weight_bytes() + sum(s.fp_bytes for s in self._morph.all_linears())}

    def morphserve_tier_speed(self, tiers: list, group_size: int) -> dict:
        """Seconds of one decoder layer's linears per tier and batch, through vLLM's kernels
        on this worker's threads (cached per machine; morphserve.runtime.tier_speed)."""
        from morphserve.runtime.tier_speed import measure
        from quant_layers.model_info import read_model_info

        # its own rank, not faults.rank(): `prompt_twin_layers: auto` asks before morphserve_init sets that
        if self._tensor_parallel()[0] != 0:  # one rank times: several at once would contend for the cores they share
            return {"seconds": {}, "source": "timed by rank 0"}

        info = read_model_info(Path(self.vllm_config.model_config.model))
        dtype = str(self.vllm_config.model_config.dtype).removeprefix("torch.")  # the rungs' own arithmetic
        reading = measure(info.linear_shapes, list(tiers), int(group_size), info.num_layers, dtype=dtype)
        return {"seconds": {t: {str(b): s for b, s in v.items()} for t, v in reading.seconds.items()},
                "source": reading.source, "dtype": dtype}

    def morphserve_trim_heap(self, busy: bool = False) -> dict:
        """Hand the freed heap back to the OS now, between two steps (heap trim modes
        "boundary" and "idle": the engine core asks at a boundary once the interval has passed;
        `busy`: requests are running, which mode "idle" trims only after enough growth)."""
        if self._trimmer.available:
            self._trimmer.tick(busy=bool(busy))
        return {"calls": self._trimmer.calls}

    def morphserve_apply(self, quantize: list, restore: list) -> dict:
        """Entries: a layer id, or [layer, tier] in a tiered pack."""
        return self._morph.apply(quantize, restore)

    def morphserve_restore_begin(self, layers: list) -> dict:
        return self._morph.restore_begin(layers)

    def morphserve_restore_ready(self) -> int:
        """How many layers of the restore could be installed now (in restore order)."""
        return self._morph.restore_ready()

    def morphserve_restore_commit(self, limit: int | None = None) -> dict:
        return self._morph.restore_commit(limit)

    def morphserve_restore_cancel(self) -> dict:
        return self._morph.restore_cancel()

    def morphserve_set_tiers(self, target: dict) -> dict:
        """Bring every layer to `target` (layer -> tier; bf16 where absent): how the engine
        puts every rank back on one map after a plan failed on some of them."""
        return self._morph.set_tiers({int(k): v for k, v in target.items()})

    def morphserve_quantized(self) -> list[int]:
        return self._morph.quantized()

    def morphserve_tiers(self) -> dict[str, str]:
        return self._morph.tiers()

    def morphserve_drop_page_cache(self) -> dict:
        return self._morph.drop_page_cache()

    def _tensor_parallel(self) -> tuple[int, int]:
        """(rank, world size) of this worker's tensor-parallel group, read off its first layer."""
        return shards.tensor_parallel(kernels.decoder_layers(self.model_runner.model)[0].self_attn.qkv_proj)

    def _weight_bytes(self) -> int:
        """Bytes of the model's own parameters (the swappable linears' live in their closures)."""
        return sum(p.numel() * p.element_size() for p in self.model_runner.model.parameters())

    def morphserve_memory(self, kv_resident: bool = False) -> dict:
        """What this worker holds: weights the model computes with (in whichever precision,
        resident prompt twins included), twins resident outside the model (none: they stay in
        the pack file), and its RSS.
        Read on every /morphserve/state and /metrics scrape, so it does not trim the heap
        (transitions end trimmed, and the heap trimmer's thread trims between them)."""
        params = self._weight_bytes()
        backing = kv_cache.kv_backing()
        return {"weights_bytes": params + self._morph.live_bytes(), "twin_bytes": 0,
                "prepared_bytes": self._morph.prepared_bytes(),
                "split_layers": self._morph.split_layers(),  # in two tiers at once: must stay empty
                "finishing_restores": self._morph.finishing_restores(),  # a transient: read again soon
                "kv_resident_bytes": backing.resident_bytes() if kv_resident and backing is not None else None,
                "heap_trim": self._trimmer.report(), **process_rss()}

    # -- KV resizing ------------------------------------------------------------------
    def morphserve_kv_release(self, first_block: int, last_block: int) -> dict:
        """Hand back the memory of blocks first_block..last_block (already hidden, all free)."""
        backing = kv_cache.kv_backing()
        if backing is None:
            return {"advised": 0, "rss_delta": 0, "backing": "none"}
        rss_before = rss_bytes()
        maybe_fail("kv_release")
        ranges = tail_ranges(kv_cache.tensor_layouts(self.model_runner.kv_cache_config), first_block, last_block)
        advised = backing.release(ranges)
        return {"advised": advised, "rss_delta": rss_before - rss_bytes(), "backing": backing.kind}

    def morphserve_kv_release_runs(self, runs: list) -> dict:
        """Hand back the memory of free blocks that stay visible to vLLM (the cold tail:
        kv_resize.cold_tail), given as [first, last] runs; none is in use or cached."""
        backing = kv_cache.kv_backing()
        if backing is None:
            return {"advised": 0, "backing": "none"}
        layouts = kv_cache.tensor_layouts(self.model_runner.kv_cache_config)
        return {"advised": sum(backing.release(tail_ranges(layouts, first, last)) for first, last in runs),
                "backing": backing.kind}

    def morphserve_kv_commit(self, first_block: int, last_block: int) -> dict:
        """Back blocks first_block..last_block with memory before the pool shows them (only
        called for a backing that does not commit on first touch)."""
        backing = kv_cache.kv_backing()
        ranges = tail_ranges(kv_cache.tensor_layouts(self.model_runner.kv_cache_config), first_block, last_block)
        return {"committed": backing.commit(ranges), "backing": backing.kind}

    def morphserve_kv_migrate(self, pairs: list[tuple[int, int]]) -> dict:
        """Copy KV blocks src -> dst in every layer and rewrite this worker's block tables."""
        t0 = time.monotonic()
        kv_cache.copy_kv_blocks(self.model_runner, pairs)
        kv_cache.remap_worker_block_tables(self.model_runner, dict(pairs))
        return {"moved": len(pairs), "seconds": time.monotonic() - t0}

    def morphserve_rss(self) -> int:
        trim_heap()
        return rss_bytes()
