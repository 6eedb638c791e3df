"""Scheduler-side touches on vLLM internals for KV resizing, for vLLM 0.32.0 only.

Everything here runs at a step boundary: after update_from_output of step N and before
schedule() of step N+1, on the engine-core thread. The runtime sees only the adapters:
`VllmBlockStore` (kv_resize.elastic_pool.BlockStore over vLLM's BlockPool),
`SchedulerView` (what the controller reads and changes in the scheduler) and
`StepSampler` (one policies.StepSample per boundary).
"""

from __future__ import annotations

import time
from collections import defaultdict

from morphserve.errors import MorphServeError


# how many waiting requests' needs a sample lists, in admission order: a KV admission gate
# (policies.admission.kv_admission_cap) reads them; more would not be admitted in one step
WAITING_NEEDS = 16


class VllmBlockStore:
    """kv_resize.elastic_pool.BlockStore over vLLM's BlockPool (0.32.0), by block id."""

    def __init__(self, pool):
        self.vllm_pool = pool

    @property
    def num_usable(self) -> int:
        return len(self.vllm_pool.blocks) - 1  # block 0 is vLLM's null block

    def ref_cnt(self, block_id: int) -> int:
        return self.vllm_pool.blocks[block_id].ref_cnt

    def cached_hash(self, block_id: int):
        return self.vllm_pool.blocks[block_id].block_hash

    def in_free_queue(self, block_id: int) -> bool:
        return self.vllm_pool.blocks[block_id].prev_free_block is not None

    def take_free(self, block_id: int) -> None:
        """Out of the free queue, and first out of the prefix cache: a block vLLM cannot
        hand out must not be found by a prefix-cache lookup either."""
        block = self.vllm_pool.blocks[block_id]
        self.vllm_pool._maybe_evict_cached_block(block)
        self.vllm_pool.free_block_queue.remove(block)

    def forget_cached(self, block_id: int) -> None:
        self.vllm_pool._maybe_evict_cached_block(self.vllm_pool.blocks[block_id])

    def give_back(self, block_ids: list[int]) -> None:
        """Append at the back: vLLM hands out free blocks from the front, so recently freed
        (cache-warm) blocks are still reused first."""
        self.vllm_pool.free_block_queue.append_n([self.vllm_pool.blocks[i] for i in block_ids])

    def move_back(self, block_ids: list[int]) -> None:
        """Free blocks to the back of the queue, in this order, keeping any cached prefix: vLLM
        keeps freed blocks cached in its free queue and evicts one only when it hands it out."""
        blocks = [self.vllm_pool.blocks[i] for i in block_ids]
        for block in blocks:
            self.vllm_pool.free_block_queue.remove(block)
        self.vllm_pool.free_block_queue.append_n(blocks)

    def free_ids(self) -> list[int]:
        """Free block ids in the queue's eviction order."""
        return [b.block_id for b in self.vllm_pool.free_block_queue.get_all_free_blocks()]

    def num_free(self) -> int:
        return self.vllm_pool.get_num_free_blocks()

    def set_visible_total(self, num_blocks: int) -> None:
        # BlockPool.get_usage() divides by num_gpu_blocks - 1, and reset_prefix_cache()
        # compares against it: both must count only blocks vLLM can see.
        self.vllm_pool.num_gpu_blocks = num_blocks

    def visible_total(self) -> int:
        return self.vllm_pool.num_gpu_blocks


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


def take_free_blocks(scheduler, block_ids: list[int]) -> None:
    """Remove specific free blocks from the free queue (migration destinations)."""
    store = VllmBlockStore(block_pool(scheduler))
    for i in block_ids:
        assert store.ref_cnt(i) == 0
        store.take_free(i)


def return_free_blocks(scheduler, block_ids: list[int]) -> None:
    """Undo take_free_blocks (a migration that did not happen)."""
    VllmBlockStore(block_pool(scheduler)).give_back(block_ids)


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


class SchedulerView:
    """The controller's handle on its engine's scheduler (attached as the scheduler is built)."""

    def __init__(self, scheduler, vllm_config):
        self._scheduler = scheduler
        self._vllm_config = vllm_config
        self._configured_active: int | None = None  # vLLM's own admission limit, read at the first change
        self._configured_tokens: int | None = None  # vLLM's own tokens per step, read at the first change

    @property
    def block_size(self) -> int:
        return self._scheduler.block_size

    def check_single_group(self) -> None:
        check_single_group(self._scheduler)

    def block_store(self) -> VllmBlockStore:
        return VllmBlockStore(block_pool(self._scheduler))

    def block_owners(self) -> dict[int, list[str]]:
        return block_owners(self._scheduler)

    def request_progress(self, req_ids) -> dict[str, int]:
        return request_progress(self._scheduler, req_ids)

    def preempt(self, req_ids: list[str]) -> list[str]:
        return preempt(self._scheduler, req_ids)

    def remap_blocks(self, moves: dict[int, int]) -> None:
        remap_blocks(self._scheduler, moves)

    def take_free_blocks(self, block_ids: list[int]) -> None:
        take_free_blocks(self._scheduler, block_ids)

    def return_free_blocks(self, block_ids: list[int]) -> None:
        return_free_blocks(self._scheduler, block_ids)

    def sync_capacity_view(self, usable_blocks: int) -> None:
        sync_capacity_view(self._vllm_config, self._scheduler, usable_blocks)

    def set_admission_cap(self, cap: int | None) -> int:
        """Lower vLLM 0.32's admission limit into RUNNING (`Scheduler.max_num_active_reqs`,
        from --max-num-active-seqs, else max_num_seqs) to `cap`, or put back the configured
        one (None); returns the limit in force. schedule() reads it per waiting request as
        `running >= limit`, so a limit under the running count preempts nothing: it only
        stops admissions until enough requests finish."""
        if self._configured_active is None:
            self._configured_active = self._scheduler.max_num_active_reqs
        limit = self._configured_active if cap is None else max(1, min(int(cap), self._configured_active))
        self._scheduler.max_num_active_reqs = limit
        return limit

    def set_token_budget(self, budget: int | None) -> int:
        """Lower the tokens vLLM 0.32 schedules per step (`Scheduler.max_num_scheduled_tokens`,
        from max_num_batched_tokens, read at the start of every schedule()) to `budget`, or
        put back the configured one (None); returns the budget in force. Only with chunked
        prefill: without it a prompt longer than the budget would never be scheduled, so the
        configured budget stays. Never above the configured budget (the runner's buffers are
        sized by it)."""
        if self._configured_tokens is None:
            self._configured_tokens = self._scheduler.max_num_scheduled_tokens
        configured = self._configured_tokens
        chunked = self._scheduler.scheduler_config.enable_chunked_prefill
        limit = configured if budget is None or not chunked else max(1, min(int(budget), configured))
        self._scheduler.max_num_scheduled_tokens = limit
        return limit

    def sample(self, sampler: "StepSampler", pool, expected_output_tokens: int = 256):
        return sampler.sample(self._scheduler, pool, expected_output_tokens)


class StepSampler:
    """Reads one policies.StepSample from the scheduler at each step boundary.

    O(requests) per step. vLLM's Request.arrival_time is wall-clock time (set by the
    frontend), so ages and TTFTs use time.time(); the sample's own clock is monotonic.
    TTFT is observed at the first boundary after a request's first token.
    A request's demand at completion counts its output as the smaller of what max_tokens
    leaves and the output length learned from finished requests (an EWMA; the policy's
    `expected_output_tokens` until one finishes): clients often leave max_tokens at the
    model's whole context.
    """

    def __init__(self):
        self._known: set[str] = set()
        self._first_token: set[str] = set()
        self._preemptions = 0
        self._computed: dict[str, int] = {}  # request id -> tokens computed at the last sample
        self._outputs: dict[str, int] = {}  # request id -> output tokens at the last sample
        # request id -> vLLM Request, running or waiting at the last sample (a waiting one may
        # be scheduled and finished by the same step: a one-token request)
        self._running: dict[str, object] = {}
        self._mean_output: float | None = None

    def _served(self, r) -> int:
        """Tokens `r` was served since the last sample, as the evaluation counts them: its
        prompt with its first token, then each output token."""
        first = r.num_output_tokens >= 1 and r.request_id not in self._first_token
        if first:
            self._first_token.add(r.request_id)
        return (r.num_prompt_tokens if first else 0) + max(0, r.num_output_tokens - self._outputs.get(r.request_id, 0))

    def _learn_finished(self, gone: set[str]) -> tuple[int, int]:
        """Forget finished requests; return the tokens they were served and computed in their
        last step (vLLM drops a request from the scheduler in the step that finishes it; the
        object kept from the last sample has its final counts). A step's computed tokens
        decide whether prompt twins computed it: a one-token request finishes in its prompt's
        step."""
        served = computed = 0
        for rid in gone:
            r = self._running.pop(rid, None)
            if r is not None:
                served += self._served(r)
                computed += max(0, r.num_computed_tokens - self._computed.get(rid, 0))
            n = r.num_output_tokens if r is not None else self._outputs.get(rid)
            self._outputs.pop(rid, None)
            self._computed.pop(rid, None)
            if n:
                self._mean_output = n if self._mean_output is None else self._mean_output + 0.1 * (n - self._mean_output)
        return served, computed

    def sample(self, scheduler, pool, expected_output_tokens: int = 256):
        from policies.signals import StepSample

        now, wall = time.monotonic(), time.time()
        requests = scheduler.requests
        ids = set(requests)
        arrivals = len(ids - self._known)
        served, tokens = self._learn_finished(self._known - ids)
        self._known = ids
        self._first_token &= ids
        ttfts = []
        prefill = pending = prompts = 0
        self._running = {}
        for r in scheduler.running:
            if r.num_output_tokens >= 1 and r.request_id not in self._first_token:
                ttfts.append(max(0.0, wall - r.arrival_time))
            served += self._served(r)
            before = self._computed.get(r.request_id, 0)
            tokens += max(0, r.num_computed_tokens - before)
            prompt = r.num_prompt_tokens
            prompts += prompt
            prefill += max(0, min(r.num_computed_tokens, prompt) - min(before, prompt))
            pending += max(0, prompt - r.num_computed_tokens)
            self._computed[r.request_id] = r.num_computed_tokens
            self._outputs[r.request_id] = r.num_output_tokens
            self._running[r.request_id] = r
        preemptions = sum(r.num_preemptions for r in requests.values())
        new_preemptions, self._preemptions = max(0, preemptions - self._preemptions), preemptions
        waiting = list(scheduler.waiting)
        for r in waiting:
            self._running.setdefault(r.request_id, r)
            pending += max(0, r.num_prompt_tokens - r.num_computed_tokens)
            prompts += r.num_prompt_tokens
        block = scheduler.block_size
        running = scheduler.running
        remaining = [r.max_tokens - r.num_output_tokens for r in running]
        expected = self._mean_output if self._mean_output is not None else expected_output_tokens

        def left(r) -> float:  # output tokens the request is still expected to produce
            return max(0.0, min(r.max_tokens - r.num_output_tokens, expected - r.num_output_tokens))

        def need(r) -> int:  # blocks the request holds when it finishes
            return -(-int(r.num_prompt_tokens + r.num_output_tokens + left(r)) // block)

        waiting_needs = [need(r) for r in waiting]  # once per boundary: summed, and the first listed
        return StepSample(
            time=now,
            waiting=len(waiting),
            oldest_wait_s=max((wall - r.arrival_time for r in waiting), default=0.0),
            running=len(running),
            used_blocks=pool.visible - pool.store.num_free(),
            capacity_blocks=pool.visible,
            arrivals=arrivals,
            preemptions=new_preemptions,
            ttfts=tuple(ttfts),
            waiting_blocks=sum(-(-r.num_prompt_tokens // block) for r in waiting),
            remaining_tokens=sum(remaining) / len(remaining) if remaining else 0.0,
            running_need_blocks=sum(need(r) for r in running),
            waiting_need_blocks=sum(waiting_needs),
            waiting_needs=tuple(waiting_needs[:WAITING_NEEDS]),
            tokens=tokens,
            served_tokens=served,
            prefill_tokens=prefill,
            pending_prompt_tokens=pending,
            pending_output_tokens=int(sum(left(r) for r in running) + sum(left(r) for r in waiting)),
            prompt_tokens_per_request=prompts / (len(running) + len(waiting)) if running or waiting else 0.0,
            output_tokens_per_request=float(expected),
        )
