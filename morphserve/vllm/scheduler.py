"""Scheduler-side touches on vLLM internals for KV resizing, for vLLM 0.32.0 only.

Together with vllm_patches.py (hooks) this is MorphServe's whole coupling surface on the
engine-core side. Everything here runs at a step boundary: after update_from_output of
step N and before schedule() of step N+1, on the engine-core thread.
"""

from __future__ import annotations

import time
from collections import defaultdict

from morphserve.errors import MorphServeError


def block_pool(scheduler):
    return scheduler.kv_cache_manager.block_pool


def check_single_group(scheduler) -> None:
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise MorphServeError(
            f"MorphServe's KV resizing supports models with one KV cache group; this one has {len(managers)}")


def block_owners(scheduler) -> dict[int, list[str]]:
    """block id -> ids of the requests whose block tables hold it."""
    owners: dict[int, list[str]] = defaultdict(list)
    for mgr in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for req_id, blocks in mgr.req_to_blocks.items():
            for b in blocks:
                if not b.is_null:
                    owners[b.block_id].append(req_id)
    return owners


def request_progress(scheduler, req_ids) -> dict[str, int]:
    return {r: scheduler.requests[r].num_computed_tokens for r in req_ids if r in scheduler.requests}


def preempt(scheduler, req_ids: list[str]) -> list[str]:
    """vLLM's own recompute preemption of running requests, in the given order.

    Mirrors Scheduler.reset_prefix_cache(reset_running_requests=True), which preempts
    outside schedule(): pop from running, _preempt_request, and forget that the request
    ran last step so the model runner drops it from its persistent batch.
    """
    done = []
    now = time.monotonic()
    for req_id in req_ids:
        request = scheduler.requests.get(req_id)
        if request is None or request not in scheduler.running:
            continue  # waiting requests hold no blocks we could take by preempting
        scheduler.running.remove(request)
        scheduler._preempt_request(request, now, drop_stale_output=True)
        scheduler.prev_step_scheduled_req_ids.discard(req_id)
        done.append(req_id)
    return done


def remap_blocks(scheduler, moves: dict[int, int]) -> None:
    """Point every block table at the new block ids and move refcounts and cache hashes.

    The caller has taken the destination blocks out of the free queue; their KV data is
    copied by the workers (MorphWorkerExtension.morphserve_kv_migrate) before the next step.
    """
    pool = block_pool(scheduler)
    for mgr in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for blocks in mgr.req_to_blocks.values():
            for idx, b in enumerate(blocks):
                if b.block_id in moves:
                    blocks[idx] = pool.blocks[moves[b.block_id]]
    for src_id, dst_id in moves.items():
        src, dst = pool.blocks[src_id], pool.blocks[dst_id]
        dst.ref_cnt, src.ref_cnt = src.ref_cnt, 0
        if src.block_hash is not None or src_id in pool.cached_block_hashes_by_block:
            pool.move_block_hashes(src, dst)


def take_free_blocks(scheduler, blocks) -> None:
    """Remove specific free blocks from the free queue (migration destinations)."""
    pool = block_pool(scheduler)
    for b in blocks:
        assert b.ref_cnt == 0
        pool._maybe_evict_cached_block(b)
        pool.free_block_queue.remove(b)


def sync_capacity_view(vllm_config, scheduler, usable_blocks: int) -> None:
    """Keep vLLM's other views of the pool size in line with the elastic pool.

    BlockPool.num_gpu_blocks is kept by ElasticBlockPool; here: the watermark (a fraction
    of the pool) and cache_config.num_gpu_blocks (engine and scheduler copies).
    """
    num_blocks = usable_blocks + 1
    manager = scheduler.kv_cache_manager
    manager.watermark_blocks = int(scheduler.scheduler_config.watermark * num_blocks)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    scheduler.cache_config.num_gpu_blocks = num_blocks


class StepSampler:
    """Reads one policies.StepSample from the scheduler at each step boundary.

    O(requests) per step. vLLM's Request.arrival_time is wall-clock time (set by the
    frontend), so ages and TTFTs use time.time(); the sample's own clock is monotonic.
    TTFT is observed at the first boundary after a request's first token.
    """

    def __init__(self):
        self._known: set[str] = set()
        self._first_token: set[str] = set()
        self._preemptions = 0

    def sample(self, scheduler, pool):
        from policies.signals import StepSample

        now, wall = time.monotonic(), time.time()
        requests = scheduler.requests
        ids = set(requests)
        arrivals = len(ids - self._known)
        self._known = ids
        self._first_token &= ids
        ttfts = []
        for r in scheduler.running:
            if r.num_output_tokens >= 1 and r.request_id not in self._first_token:
                self._first_token.add(r.request_id)
                ttfts.append(max(0.0, wall - r.arrival_time))
        preemptions = sum(r.num_preemptions for r in requests.values())
        new_preemptions, self._preemptions = max(0, preemptions - self._preemptions), preemptions
        waiting = list(scheduler.waiting)
        block = scheduler.block_size
        running = scheduler.running
        remaining = [r.max_tokens - r.num_output_tokens for r in running]
        return StepSample(
            time=now,
            waiting=len(waiting),
            oldest_wait_s=max((wall - r.arrival_time for r in waiting), default=0.0),
            running=len(running),
            used_blocks=pool.visible - pool.pool.get_num_free_blocks(),
            capacity_blocks=pool.visible,
            arrivals=arrivals,
            preemptions=new_preemptions,
            ttfts=tuple(ttfts),
            waiting_blocks=sum(-(-r.num_prompt_tokens // block) for r in waiting),
            remaining_tokens=sum(remaining) / len(remaining) if remaining else 0.0,
        )
