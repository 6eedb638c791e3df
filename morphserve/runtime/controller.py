"""Engine-core side of MorphServe: owns the morph level, the KV budget and the elastic
block pool, and executes transitions.

It lives in the engine-core process, next to the scheduler and the executor. Transitions
run only at step boundaries: from the post_step hook, or from a utility call (which vLLM
handles between steps on the same thread). Layers are quantized in the pack's swap order
and restored last-in-first-out.

Memory order (README, "The elastic KV cache"):
- quantize: workers swap layers in (freeing fp16 weights), then the block pool grows;
- restore: the block pool shrinks first (free tail blocks are hidden; blocks in use are
  waited for, preempted or migrated, per `shrink_strategy`), then the workers release the
  tail's KV pages, then copy fp16 back. A restore that must wait stays pending and is
  retried at every step boundary.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from dataclasses import replace

from kv_resize.budget import BudgetError, KVBudget
from kv_resize.elastic_pool import DrainResult, ElasticBlockPool
from morphserve.offline import pack as packfmt
from morphserve.vllm import scheduler as vs
from morphserve.errors import MorphServeError
from morphserve.vllm.metrics import TransitionHistogram
from policies import PolicyState, SignalTracker, load_policy, make_policy

log = logging.getLogger("morphserve")


@dataclass(frozen=True)
class TransitionPlan:
    quantize: list[int]
    restore: list[int]


def plan_transition(order: list[int], current: list[int], level: int) -> TransitionPlan:
    """Layers to quantize (in swap order) and restore (LIFO) to reach `level` quantized layers."""
    target = order[:level]
    quantize = [i for i in target if i not in current]
    restore = [i for i in reversed(order) if i in current and i not in target]
    return TransitionPlan(quantize, restore)


def preemption_order(busy: list[int], owners: dict[int, list[str]], progress: dict[str, int]) -> list[str]:
    """Every request holding a busy tail block must go; least progress first loses least work."""
    victims = {r for b in busy for r in owners.get(b, ())}
    return sorted(victims, key=lambda r: (progress.get(r, 0), r))


def model_weight_bytes(model_dir: Path) -> int:
    """Bytes of the served weights as stored (safetensors); what vLLM holds at level 0."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


class MorphController:
    def __init__(self, cfg: dict, engine_core, manifest: packfmt.Manifest):
        self.cfg = cfg
        self.core = engine_core
        self.manifest = manifest
        self.order = list(manifest.swap_order)
        self._quantized: list[int] = []
        # (monotonic, wall) time and level of every change of the level in force, not yet
        # written to the transition log: each logged record carries the changes it made, so
        # an evaluation can tell the precision every token was computed at.
        self.level_changes: list[list] = []
        self.forced_level: int | None = None
        self.pending_level: int | None = None
        self.restoring: dict | None = None  # a background restore in progress (see _begin_restore)
        self.transitions = 0
        self.deferrals = 0
        self.recent: deque[dict] = deque(maxlen=50)
        self.log_path = Path(cfg["transition_log"]) if cfg.get("transition_log") else None
        self.budget: KVBudget | None = None
        self.pool: ElasticBlockPool | None = None
        self.policy = None
        self.policy_name = "none"
        self.policy_state = PolicyState()
        self.policy_target: int | None = None
        self.tracker: SignalTracker | None = None
        self.sampler = vs.StepSampler()
        self.signals = None
        self.decision_seconds: deque[float] = deque(maxlen=2000)
        self.step_seconds: deque[float] = deque(maxlen=2000)  # boundary to boundary, while serving
        self.by_direction = {"quantize": 0, "restore": 0}
        self.histogram = TransitionHistogram()
        self.errors = 0
        self.last_error: dict | None = None
        self.pinned_by_error = False
        self._last_manual = float("-inf")
        self._recovery_shrink_from: int | None = None

    @classmethod
    def start(cls, cfg: dict, engine_core) -> "MorphController":
        manifest = packfmt.load_manifest(Path(cfg["pack"]))
        results = engine_core.model_executor.collective_rpc("morphserve_init", args=(cfg,))
        log.info("MorphServe: %d swappable layers loaded on %d worker(s) in %.1f s",
                 results[0]["layers"], len(results), results[0]["seconds"])
        return cls(cfg, engine_core, manifest)

    @property
    def quantized(self) -> list[int]:
        return self._quantized

    @quantized.setter
    def quantized(self, ids: list[int]) -> None:
        if len(ids) != len(self._quantized):
            self.level_changes.append([time.monotonic(), time.time(), len(ids)])
        self._quantized = ids

    @property
    def num_layers(self) -> int:
        return len(self.order)

    # -- start-up: KV sizing ---------------------------------------------------------
    def plan_kv(self, fp16_kv_bytes: int, block_bytes: int) -> int:
        """Fix the budget from vLLM's measurement; return the KV bytes to reserve."""
        by_layer = {b.layer: b.fp16 - b.quantized for b in self.manifest.layer_bytes}
        savings = [by_layer[i] for i in self.order]
        weights = model_weight_bytes(Path(self.core.vllm_config.model_config.model))
        try:
            if self.cfg.get("memory_budget_gb"):
                self.budget = KVBudget(int(self.cfg["memory_budget_gb"] * 2**30), weights, tuple(savings), block_bytes)
            else:
                self.budget = KVBudget.from_fp16_kv(fp16_kv_bytes, weights, savings, block_bytes)
        except BudgetError as e:
            raise MorphServeError(f"memory_budget_gb: {e}") from None
        log.info("MorphServe: budget %.1f MiB; KV %d..%d blocks from 0..%d quantized layers",
                 self.budget.budget_bytes / 2**20, self.budget.usable_blocks(0),
                 self.budget.usable_blocks(self.num_layers), self.num_layers)
        return self.budget.reserve_bytes()

    def attach_scheduler(self, scheduler) -> None:
        """Called as the scheduler is built (before EngineCore.scheduler is even set)."""
        vs.check_single_group(scheduler)
        pool = vs.block_pool(scheduler)
        self.max_usable = len(pool.blocks) - 1
        cap0 = self.capacity(0)
        max_len = self.core.vllm_config.model_config.max_model_len
        if cap0 * scheduler.block_size < max_len:
            raise MorphServeError(
                f"the memory budget leaves {cap0 * scheduler.block_size} KV tokens at full precision, fewer than "
                f"max_model_len {max_len}; raise the budget or lower --max-model-len")
        self.pool = ElasticBlockPool(pool, cap0)
        vs.sync_capacity_view(self.core.vllm_config, scheduler, self.pool.visible)
        if self.cfg.get("policy"):
            self._start_policy(self.cfg["policy"])

    def _start_policy(self, ref: str) -> None:
        pcfg, path = load_policy(ref)
        quality_file = Path(self.cfg["pack"]) / "quality.json"
        quality = json.loads(quality_file.read_text()) if quality_file.exists() else None
        cap = pcfg.level_cap(self.num_layers, quality)
        self.policy = make_policy(pcfg, [self.capacity(k) for k in range(self.num_layers + 1)], cap)
        self.policy_name = f"{pcfg.policy}:{path.stem}"
        self.tracker = SignalTracker(pcfg.window_s)
        log.info("MorphServe: policy %s from %s, at most %d quantized layers", pcfg.policy, path, cap)

    @property
    def background_restores(self) -> bool:
        """Policy-driven restores prepare layers in a worker thread (restore_mode)."""
        return self.cfg.get("restore_mode", "background") == "background"

    def capacity(self, level: int) -> int:
        return min(self.budget.usable_blocks(level), self.max_usable)

    # -- step boundary -------------------------------------------------------------
    idle_tick_s = 0.1

    def wants_idle_ticks(self) -> bool:
        """Idle boundaries matter only while something could still be restored."""
        if self.restoring is not None or self._recovery_shrink_from is not None:
            return True  # prepared layers (or a recovery's shrink) progress at boundaries, idle ones too
        return self.policy is not None and self.forced_level is None and (
            len(self.quantized) > 0 or self.pending_level is not None)

    def on_step_boundary(self) -> None:
        try:
            if self._recovery_shrink_from is not None and self.restoring is None:
                self._finish_recovery_shrink()
            if self.restoring is not None:
                self._commit_restore()
            if self.tracker is not None:
                self._decide()
            if self.pending_level is not None:
                level = self.pending_level
                if level == len(self.quantized):
                    self.pending_level = None
                else:
                    # A deferred manual restore stays synchronous, as the request asked.
                    self.transition(level, reason="pending",
                                    background=self.forced_level is None and self.background_restores)
        except Exception as e:  # nothing may escape into vLLM's engine loop: it would kill the engine
            self._recover(e, "a step-boundary transition")

    def _decide(self) -> None:
        t0 = time.perf_counter()
        previous = self.signals
        self.signals = self.tracker.add(self.sampler.sample(self.core.scheduler, self.pool))
        if previous is not None and previous.running and self.signals.running:
            self.step_seconds.append(self.signals.time - previous.time)
        if self.forced_level is not None or self.policy is None:
            return
        decision = self.policy.decide(self.signals, replace(self.policy_state, level=len(self.quantized)))
        self.decision_seconds.append(time.perf_counter() - t0)
        self.policy_state, self.policy_target = decision.state, decision.target
        if self.restoring is not None and decision.target <= len(self.quantized):
            return  # let the restore in progress finish; only a need for capacity interrupts it
        if decision.target != len(self.quantized) and decision.target != self.pending_level:
            self.transition(decision.target, reason=decision.reason,
                            background=self.background_restores)

    def transition(self, level: int, reason: str, background: bool = False) -> dict:
        """Move to `level` quantized layers. A restore with `background` only starts here:
        its KV is shrunk now and the layers are installed at later step boundaries."""
        if self.restoring is not None:
            self._cancel_restore()
        self._recovery_shrink_from = None  # this transition's own shrink or grow accounts for the pool now
        t0 = time.monotonic()
        before_level, before_blocks = len(self.quantized), self.pool.visible
        if level >= before_level and self.pool.limit < self.capacity(before_level):
            self.pool.grow(self.capacity(before_level))  # a pending restore is called off
        plan = plan_transition(self.order, self.quantized, level)
        was_pending, self.pending_level = self.pending_level, None
        if not plan.quantize and not plan.restore:
            vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
            return {"ok": True, "quantized_layers": len(self.quantized), "changed": False}
        record = {"time": time.time(), "from": before_level, "to": level, "reason": reason,
                  "policy": self.policy_name, "quantized_layer_ids": plan.quantize, "restored_layer_ids": plan.restore,
                  "signals": self.signals.as_dict() if self.signals is not None else None}
        if plan.quantize:
            worker = self._apply(plan.quantize, [], level)
            self.pool.grow(self.capacity(len(self.quantized)))
        else:
            kv = self._shrink_kv(self.capacity(level))
            record["kv"] = kv
            if not kv["done"]:
                self.deferrals += was_pending != level  # count a restore once, not per retry
                self.pending_level = level
                vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
                return {"ok": True, "deferred": True, "quantized_layers": len(self.quantized),
                        "busy_blocks": kv["busy"], "changed": False}
            if background:
                return self._begin_restore(plan.restore, level, record, t0, before_blocks)
            try:
                worker = self._apply([], plan.restore, level)
            except MorphServeError:
                self.pool.grow(self.capacity(len(self.quantized)))  # weights stayed quantized
                vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
                raise
        vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
        record.update({
            "fp_bytes_freed": worker["fp_bytes_freed"], "bytes_freed": worker["bytes_freed"],
            "rss_delta": worker["rss_delta"], "worker_seconds": worker["seconds"],
        })
        self._finish(record, before_blocks, t0, "quantize" if plan.quantize else "restore")
        return {"ok": True, "quantized_layers": len(self.quantized), "changed": True, "transition": record}

    def _finish(self, record: dict, before_blocks: int, t0: float, direction: str) -> None:
        record.update({"to": len(self.quantized), "kv_blocks_before": before_blocks,
                       "kv_blocks_after": self.pool.visible, "seconds": time.monotonic() - t0})
        self.transitions += 1
        self.by_direction[direction] += 1
        self.histogram.observe(record["seconds"])
        self.recent.append(record)
        self._write_log(record)

    def _write_log(self, record: dict) -> None:
        record["levels"], self.level_changes = self.level_changes, []
        if self.log_path:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk must not fail a transition that already happened
                log.warning("MorphServe: could not append to the transition log %s: %s", self.log_path, e)

    # -- failures --------------------------------------------------------------------
    def _recover(self, error: BaseException, during: str) -> None:
        """After any failure: take the level the workers actually serve (each layer is
        wholly bf16 or W4: the workers roll back their own partial swaps), give the KV pool
        that level's capacity, and pin it, so the policy does not retry a failing
        transition at every step. An operator unpins with POST {"quantized_layers": null}."""
        try:
            self.errors += 1
            log.error("MorphServe: %s failed: %s", during, error, exc_info=not isinstance(error, MorphServeError))
            self.pending_level = None
            if self.restoring is not None:
                self.restoring = None
                self._try_rpc("morphserve_restore_cancel")
            ids = self._try_rpc("morphserve_quantized")
            if ids is not None:
                self.quantized = [i for i in self.order if i in ids]
            level = len(self.quantized)
            cap = self.capacity(level)
            if self.pool.limit < cap:
                self.pool.grow(cap)  # a shrink for a restore that did not happen is called off
            elif self.pool.limit > cap:  # fewer layers W4 than the pool was sized for
                self._recovery_shrink_from = self.pool.committed
                self.pool.set_limit(cap)
                self._finish_recovery_shrink()
            vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
            self.forced_level, self.pinned_by_error = level, True
            self.last_error = {"time": time.time(), "during": during, "error": f"{type(error).__name__}: {error}",
                               "serving_level": level}
            self._write_log({"time": time.time(), "outcome": "failed", "during": during,
                             "error": self.last_error["error"], "to": level, "policy": self.policy_name})
        except Exception:  # the last line: log, never raise into vLLM
            log.critical("MorphServe: recovery after %s failed; level and KV view may disagree", during,
                         exc_info=True)

    def _finish_recovery_shrink(self) -> None:
        """After a failed rollback left more bf16 layers than the pool was sized for, the
        blocks above the smaller capacity are hidden as they free (at each boundary, even
        while pinned) and their pages released once none is in use."""
        if self._recovery_shrink_from is None or self.pool.drain().done is False:
            return
        first, last = self.pool.committed + 1, self._recovery_shrink_from
        self._recovery_shrink_from = None
        if last >= first:
            self._try_rpc("morphserve_kv_release", first, last)

    def _try_rpc(self, method: str, *args):
        """A worker call during recovery: its failure is logged, not raised."""
        try:
            return self.core.model_executor.collective_rpc(method, args=args)[0]
        except Exception as e:
            log.error("MorphServe: %s failed during recovery: %s", method, e)
            return None

    # -- restores prepared in the background ---------------------------------------------
    def _begin_restore(self, layers: list[int], level: int, record: dict, t0: float, before_blocks: int) -> dict:
        """The KV is already shrunk to the target's capacity; the workers now prepare the
        bf16 layers in a thread while the model keeps running them in W4."""
        try:
            self.core.model_executor.collective_rpc("morphserve_restore_begin", args=(layers,))
        except Exception as e:
            self.pool.grow(self.capacity(len(self.quantized)))  # weights stayed quantized
            vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
            raise MorphServeError(f"could not start the restore to {level}: {e}") from e
        record.update(mode="background", steps=0, committed_layer_ids=[])
        self.restoring = {"level": level, "record": record, "t0": t0, "before_blocks": before_blocks,
                          "commit_seconds": 0.0}
        vs.sync_capacity_view(self.core.vllm_config, self.core.scheduler, self.pool.visible)
        return {"ok": True, "restoring": True, "quantized_layers": len(self.quantized), "changed": False}

    def _commit_restore(self) -> None:
        r = self.restoring
        t = time.monotonic()
        try:
            results = self.core.model_executor.collective_rpc("morphserve_restore_commit")
        except Exception as e:
            self._abandon_restore(f"commit failed: {e}")
            return
        result = results[0]
        r["commit_seconds"] += time.monotonic() - t
        r["record"]["steps"] += 1
        r["record"]["committed_layer_ids"] += result["committed"]
        self.quantized = [i for i in self.order if i in result["quantized"]]
        if result["error"]:
            self._abandon_restore(result["error"])
        elif result["done"]:
            self.restoring = None
            r["record"]["commit_seconds"] = r["commit_seconds"]
            self._finish(r["record"], r["before_blocks"], r["t0"], "restore")

    def _abandon_restore(self, why: str) -> None:
        """A failed commit or preparer: layers already installed stay bf16, the rest stay W4
        (and keep their KV: the pool grows back); the level is pinned like any failure."""
        level = self.restoring["level"]
        self._recover(MorphServeError(f"background restore to {level} stopped: {why}"), "a background restore")

    def _cancel_restore(self) -> None:
        r = self.restoring
        try:
            ids = self.core.model_executor.collective_rpc("morphserve_restore_cancel")[0]["quantized"]
        except Exception as e:  # still `restoring`: recovery tries the cancel again
            raise MorphServeError(f"could not cancel the restore in progress: {e}") from e
        self.restoring = None
        self.quantized = [i for i in self.order if i in ids]
        r["record"].update(cancelled=True, outcome="cancelled", to=len(self.quantized))
        self._write_log(r["record"])
        log.info("MorphServe: restore to %d called off at %d", r["level"], len(self.quantized))

    def _apply(self, quantize: list[int], restore: list[int], level: int) -> dict:
        try:
            results = self.core.model_executor.collective_rpc("morphserve_apply", args=(quantize, restore))
        except Exception as e:  # the worker rolled its own swaps back; resync to be sure
            self.quantized = self._worker_quantized()
            log.error("MorphServe: transition to %d failed (%s); serving at %d", level, e, len(self.quantized))
            raise MorphServeError(f"transition to {level} quantized layers failed: {e}") from e
        self.quantized = [i for i in self.order if i in results[0]["quantized"]]
        return results[0]

    # -- KV shrink ---------------------------------------------------------------------
    def _shrink_kv(self, target: int) -> dict:
        committed_before = self.pool.committed
        self.pool.set_limit(target)
        result = self.pool.drain()
        action: dict = {}
        strategy = self.cfg.get("shrink_strategy", "wait")
        if not result.done and strategy == "preempt":
            result, action = self._preempt_tail(result)
        elif not result.done and strategy == "migrate":
            result, action = self._migrate_tail(result)
        out = {"done": result.done, "busy": len(result.busy), "strategy": strategy, **action}
        if result.done and committed_before > self.pool.committed:
            rel = self.core.model_executor.collective_rpc(
                "morphserve_kv_release", args=(self.pool.committed + 1, committed_before))[0]
            out.update(released_blocks=committed_before - self.pool.committed,
                       released_bytes=rel["advised"], kv_rss_delta=rel["rss_delta"])
        return out

    def _preempt_tail(self, result: DrainResult) -> tuple[DrainResult, dict]:
        scheduler = self.core.scheduler
        owners = vs.block_owners(scheduler)
        victims = preemption_order(list(result.busy), owners,
                                   vs.request_progress(scheduler, {r for b in result.busy for r in owners[b]}))
        preempted = vs.preempt(scheduler, victims)
        log.info("MorphServe: preempted %d request(s) holding %d KV blocks above the new capacity",
                 len(preempted), len(result.busy))
        return self.pool.drain(), {"preempted": preempted}

    def _migrate_tail(self, result: DrainResult) -> tuple[DrainResult, dict]:
        busy = list(result.busy)
        free_low = self.pool.free_low_blocks()
        if len(free_low) < len(busy):
            msg = (f"migrate does not fit: {len(busy)} KV blocks in use above the new capacity, "
                   f"{len(free_low)} free below it; waiting instead")
            log.info("MorphServe: %s", msg)
            return result, {"migrate_fit": False, "note": msg}
        scheduler = self.core.scheduler
        dst = free_low[: len(busy)]
        moves = {src: b.block_id for src, b in zip(busy, dst)}
        vs.take_free_blocks(scheduler, dst)
        vs.remap_blocks(scheduler, moves)
        try:
            self.core.model_executor.collective_rpc("morphserve_kv_migrate", args=(list(moves.items()),))
        except Exception as e:
            vs.remap_blocks(scheduler, {d: s for s, d in moves.items()})
            vs.block_pool(scheduler).free_block_queue.append_n(dst)
            raise MorphServeError(f"KV block migration failed, nothing moved: {e}") from e
        self.pool.hide_detached(moves.keys())
        return self.pool.drain(), {"migrate_fit": True, "migrated": len(moves)}

    def _decision_us(self) -> dict | None:
        times = sorted(self.decision_seconds)
        if not times:
            return None
        steps = sorted(self.step_seconds)
        return {"n": len(times), "p50": times[len(times) // 2] * 1e6, "p99": times[int(0.99 * (len(times) - 1))] * 1e6,
                "max": times[-1] * 1e6, "step_p50_us": steps[len(steps) // 2] * 1e6 if steps else None}

    def _worker_quantized(self) -> list[int]:
        ids = self.core.model_executor.collective_rpc("morphserve_quantized")[0]
        return [i for i in self.order if i in ids]

    # -- control surface -------------------------------------------------------------
    def set_level_request(self, level, rate_limited: bool = False) -> dict:
        """POST /morphserve/level: an int forces a level (policy paused); None hands control back.
        Requests over HTTP (`rate_limited`) may change the level at most once per
        manual_min_interval_s: each costs decode steps, so a caller in a loop could stall serving."""
        if level is None:
            self.forced_level, self.pinned_by_error = None, False
            return {"ok": True, **self.state()}
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.num_layers:
            return {"ok": False, "status": 400,
                    "error": f"quantized_layers must be an integer in 0..{self.num_layers}, got {level!r}"}
        now = time.monotonic()
        interval = float(self.cfg.get("manual_min_interval_s", 1.0))
        wait = self._last_manual + interval - now
        if rate_limited and wait > 0 and level != len(self.quantized):
            return {"ok": False, "status": 429, "retry_after_s": round(wait, 3),
                    "error": f"manual level changes are limited to one per {interval} s "
                             f"(manual_min_interval_s); retry in {wait:.2f} s"}
        if rate_limited:
            self._last_manual = now
        self.forced_level, self.pinned_by_error = level, False
        try:
            result = self.transition(level, reason="manual")
        except Exception as e:
            self._recover(e, f"manual transition to {level}")
            return {"ok": False, "status": 503, **self.state(),
                    "error": f"transition to {level} failed and was rolled back; serving at "
                             f"{len(self.quantized)} quantized layers: {e}"}
        return {**result, **self.state()}

    def kv_state(self) -> dict:
        block_size = self.core.scheduler.block_size
        return {
            "kv_capacity_blocks": self.pool.visible,
            "kv_capacity_tokens": self.pool.visible * block_size,
            "kv_committed_blocks": self.pool.committed,
            "kv_target_blocks": self.pool.limit,
            "kv_reserved_blocks": self.max_usable,
            "kv_free_blocks": self.pool.pool.get_num_free_blocks(),
            "memory_budget_bytes": self.budget.budget_bytes,
            "kv_blocks_by_level": [self.capacity(k) for k in range(self.num_layers + 1)],
            "shrink_strategy": self.cfg.get("shrink_strategy", "wait"),
            "pending_level": self.pending_level,
            "restoring_to": self.restoring["level"] if self.restoring else None,
            "deferred_restores": self.deferrals,
        }

    def memory_state(self, kv_resident: bool = False) -> dict:
        """The budget equation, checked live: weights (as computed with, in whichever
        precision) + resident twins + bf16 layers prepared by a background restore and not
        yet installed + committed KV pages <= budget. Weights and RSS are
        read in the worker; the KV figure counts every block that may hold pages (the
        committed ids and vLLM's null block)."""
        try:
            worker = self.core.model_executor.collective_rpc("morphserve_memory", args=(kv_resident,))[0]
        except Exception as e:  # a state read must not fail because one figure could not be read
            return {"error": f"worker memory query failed: {e}"}
        kv = (self.pool.committed + 1) * self.budget.block_bytes
        accounted = worker["weights_bytes"] + worker["twin_bytes"] + worker["prepared_bytes"] + kv
        return {"budget_bytes": self.budget.budget_bytes, "weights_bytes": worker["weights_bytes"],
                "twin_bytes": worker["twin_bytes"], "prepared_bytes": worker["prepared_bytes"], "kv_bytes": kv,
                "accounted_bytes": accounted,
                "within_budget": accounted <= self.budget.budget_bytes,
                "kv_resident_bytes": worker["kv_resident_bytes"],
                "rss_anon_bytes": worker["rss_anon_bytes"], "rss_file_bytes": worker["rss_file_bytes"]}

    def state(self, kv_resident: bool = False) -> dict:
        return {
            "active": True,
            "pack": self.cfg["pack"],
            "twin": self.cfg.get("twin", "pack"),
            "quantized_layers": len(self.quantized),
            "swappable_layers": self.num_layers,
            "quantized_layer_ids": list(self.quantized),
            "swap_order": self.order,
            "forced_level": self.forced_level,
            **self.kv_state(),
            "memory": self.memory_state(kv_resident),
            "policy": "manual" if self.forced_level is not None else self.policy_name,
            "policy_target": self.policy_target,
            "policy_max_level": self.policy.max_level if self.policy else None,
            "signals": self.signals.as_dict() if self.signals is not None else None,
            "decision_us": self._decision_us(),
            "transitions": self.transitions,
            "errors": self.errors,
            "last_error": self.last_error,
            "pinned_by_error": self.pinned_by_error,
            "transitions_by_direction": dict(self.by_direction),
            "transition_seconds": self.histogram.as_dict(),
            "recent_transitions": list(self.recent)[-10:],
        }
