"""Planning and executing transitions, and putting things right when one fails.

Memory order (docs/ARCHITECTURE.md, "One transition"):
- quantize: workers swap layers in (freeing bf16 weights), then the block pool grows;
- restore: the block pool shrinks first (free tail blocks are hidden; blocks in use are
  waited for, preempted or migrated, per `shrink_strategy`), then the workers release the
  tail's KV pages, then copy bf16 back. A restore that must wait stays pending and is
  retried at every step boundary. A background restore prepares the bf16 layers in a
  worker thread and installs them at later boundaries.
- a background compression prepares the new tier's layers the same way and installs them
  at later boundaries; the block pool grows once the last one is in, so the bytes the
  installed layers freed pay for the layers prepared ahead (quant_layers.restore_prep).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from kv_resize.elastic_pool import ElasticBlockPool
from morphserve.errors import MorphServeError
from morphserve.offline.ladder import Ladder, Rung
from morphserve.runtime.policy_loop import PolicyLoop
from morphserve.runtime.recorder import Recorder
from morphserve.runtime.shrink import shrink_kv

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


_WORKER_SUMS = ("fp_bytes_freed", "bytes_freed", "rss_delta", "seconds")

# A restore waiting for KV blocks goes part-way only for at least this many levels: each
# move stalls a step boundary (or prepares layers beside the engine), and blocks free one
# request at a time, so smaller steps would move at nearly every boundary of a drain.
PART_WAY_MIN_LEVELS = 4


def _worker_fields(worker: dict) -> dict:
    return {"fp_bytes_freed": worker["fp_bytes_freed"], "bytes_freed": worker["bytes_freed"],
            "rss_delta": worker["rss_delta"], "worker_seconds": worker["seconds"]}


class TransitionFailed(MorphServeError):
    """A transition stopped part-way; `during` names what was under way."""

    def __init__(self, message: str, during: str):
        super().__init__(message)
        self.during = during


class Transitions:
    """The level the workers serve, and every move between levels.

    `ladder` is the pack's ladder of configurations (a list of layer ids, for a pack
    without tiers, is its W4A16 swap order). `rpc(method, *args)` calls the workers by
    method name (their results, one per worker); `scheduler` is the boundary's
    SchedulerView; `capacity(level)` the usable KV blocks.
    """

    def __init__(self, ladder: Ladder | list[int], rpc: Callable, pool: ElasticBlockPool, scheduler,
                 capacity: Callable[[int], int], recorder: Recorder, policy: PolicyLoop, shrink_strategy: str,
                 commits_on_touch: bool = True, ranks: int = 1):
        if not isinstance(ladder, Ladder):
            ladder = Ladder([Rung(i, "w4a16", 0) for i in ladder])
        self.ladder = ladder
        self.order = list(dict.fromkeys(r.layer for r in ladder.rungs))  # layers, first rung first
        self.rpc = rpc
        self.pool = pool
        self.scheduler = scheduler
        self.capacity = capacity
        self.recorder = recorder
        self.policy = policy
        self.shrink_strategy = shrink_strategy
        self.commits_on_touch = commits_on_touch  # the workers' KV backing (runtime.backend)
        self.ranks = ranks  # tensor-parallel workers: every plan commits on all of them or on none
        self.config: dict[int, str] = {}  # layer -> tier, every layer not in bf16
        self.config_version = 0  # bumped whenever `config` changes
        self._level = 0
        self.pending_level: int | None = None
        # a move prepared in the background, a restore or a compression (see _begin_background)
        self.restoring: dict | None = None
        self.deferrals = 0
        self.recovery_shrink_from: int | None = None

    @property
    def quantized(self) -> list[int]:
        """Layers not in bf16, in ladder order."""
        return [i for i in self.order if i in self.config]

    def set_tiers(self, tiers: dict) -> None:
        """Take the workers' layer -> tier map; the level is the highest rung every layer
        has reached (exactly the level whenever the workers are on the ladder)."""
        config = {int(k): v for k, v in tiers.items()}
        if config != self.config:
            self.config = config
            self.config_version += 1  # what the controller's memory reading is keyed by
        level = self.ladder.nearest_level(self.config)
        if level != self._level:
            self.recorder.level_changed(level)
        self._level = level

    @property
    def level(self) -> int:
        return self._level

    def tier_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for tier in self.config.values():
            out[tier] = out.get(tier, 0) + 1
        return out

    def grow(self, target: int) -> None:
        """Let the pool show blocks up to `target`. A backing that does not commit on first
        touch (CUDA virtual memory) maps the new blocks' pages first: no block may be
        visible before its memory exists."""
        if not self.commits_on_touch and target > self.pool.committed:
            self.rpc("morphserve_kv_commit", self.pool.committed + 1, target)
        self.pool.grow(target)

    def sync_view(self) -> None:
        self.scheduler.sync_capacity_view(self.pool.visible)

    def to(self, level: int, reason: str, background: bool = False, background_compress: bool = False,
           part_of: int | None = None) -> dict:
        """Move to `level` quantized layers. A restore with `background` only starts here:
        its KV is shrunk now and the layers are installed at later step boundaries; so does
        a compression with `background_compress` (its KV grows once it is installed).

        A plan may both compress and decompress: off the ladder (a restore called off
        part-way when the W8A8 and W4A16 orders differ), reaching a level can take layers
        both ways. The compressions run first (they only free memory), then the
        decompressions, after the KV shrink they need.

        A restore whose blocks are still in use waits (pending), but not at the level it
        left: it goes at once as far down as the blocks in use allow (`_part_way`). The
        pool has already hidden every free block above the target's capacity, so the
        server holds the target's KV either way; waiting at the old level only kept its
        quality cost (measured on an AMX Xeon: 24 s at 24 W4A16 layers while the quality
        ledger went from +1.8% to +5.1%)."""
        if self.restoring is not None:
            self._cancel_restore()
        self.recovery_shrink_from = None  # this transition's own shrink or grow accounts for the pool now
        t0 = time.monotonic()
        before_level, before_blocks = self.level, self.pool.visible
        self._give_back(level)
        ladder_plan = self.ladder.plan(self.config, level)
        plan = TransitionPlan([[i, t] for i, t in ladder_plan.compress], [[i, t] for i, t in ladder_plan.decompress])
        was_pending, self.pending_level = self.pending_level, None
        if not plan.quantize and not plan.restore:
            self.sync_view()
            return {"ok": True, "quantized_layers": self.level, "changed": False}
        record = {"time": time.time(), "from": before_level, "to": level, "reason": reason,
                  "policy": self.policy.name, "quantized_layer_ids": [i for i, _ in plan.quantize],
                  "restored_layer_ids": [i for i, _ in plan.restore], "signals": self.policy.signals_dict()}
        if self.ladder.tiered:
            record["tiers_to"] = self.ladder.counts(level)
        if part_of is not None:
            record["part_of"] = part_of  # the restore still pending beyond this level
        worker: dict | None = None
        if plan.quantize and not plan.restore and background_compress:
            return self._begin_background(plan.quantize, level, record, t0, before_blocks, "quantize")
        if plan.quantize:
            worker = self._apply(plan.quantize, [], level)
            if not plan.restore:
                self.grow(self.capacity(self.level))
            else:
                self._give_back(level)  # what the compressions freed, up to the target's
        if plan.restore:
            kv = shrink_kv(self.pool, self.scheduler, self.rpc, self.capacity(level), self.shrink_strategy)
            record["kv"] = kv
            if not kv["done"]:
                part = None if plan.quantize else self._part_way(level, kv["busy_top"])
                if part is not None:
                    return self._go_part_way(level, part, kv, reason, background, was_pending)
                self.deferrals += was_pending != level  # count a restore once, not per retry
                self.pending_level = level
                self.sync_view()
                if worker is not None:  # the compressions happened: on record
                    self._finish({**record, "restored_layer_ids": [], "deferred_restore": True,
                                  **_worker_fields(worker)}, before_blocks, t0, "quantize")
                return {"ok": True, "deferred": True, "quantized_layers": self.level,
                        "busy_blocks": kv["busy"], "changed": worker is not None}
            if background:
                return self._begin_background(plan.restore, level, record, t0, before_blocks, "restore")
            try:
                restored = self._apply([], plan.restore, level)
            except MorphServeError:
                self.grow(self.capacity(self.level))  # weights stayed quantized
                self.sync_view()
                raise
            worker = restored if worker is None else {k: worker[k] + restored[k] for k in _WORKER_SUMS}
        self.sync_view()
        record.update(_worker_fields(worker))
        self._finish(record, before_blocks, t0, "restore" if plan.restore else "quantize")
        return {"ok": True, "quantized_layers": self.level, "changed": True, "transition": record}

    def _part_way(self, level: int, busy_top: int) -> int | None:
        """The lowest level between `level` and the one served whose capacity holds every
        block still in use (the highest in-use id is `busy_top`), at least
        PART_WAY_MIN_LEVELS below the level served; None where there is none."""
        for k in range(level + 1, self.level - PART_WAY_MIN_LEVELS + 1):
            if self.capacity(k) >= busy_top:
                return k
        return None

    def _go_part_way(self, level: int, part: int, kv: dict, reason: str, background: bool,
                     was_pending: int | None) -> dict:
        """Restore to `part` now and keep `level` pending. The pool's limit goes back to
        `level`'s capacity at once, so the blocks between the two that free meanwhile stay
        hidden and the rest of the restore waits no longer than it would have."""
        result = self.to(part, reason=reason, background=background, part_of=level)
        shrink_kv(self.pool, self.scheduler, self.rpc, self.capacity(level), "wait")
        self.deferrals += was_pending != level
        self.pending_level = level
        self.sync_view()
        return {**result, "deferred": True, "part_way": part, "busy_blocks": kv["busy"]}

    def _give_back(self, level: int) -> None:
        """The pool may sit below what both the present weights and the target allow (a
        restore that had drained it was just called off, a restore is pending, or a mixed
        plan's compressions just freed memory): those blocks come back first, so a shrink
        is only ever asked for below the pool's present size."""
        allowed = min(self.capacity(self.level), self.capacity(level))
        if self.pool.limit < allowed:
            self.grow(allowed)

    def _finish(self, record: dict, before_blocks: int, t0: float, direction: str) -> None:
        record.update({"to": self.level, "kv_blocks_before": before_blocks,
                       "kv_blocks_after": self.pool.visible, "seconds": time.monotonic() - t0})
        if record.get("mode") != "background" and not record.get("deferred_restore"):
            self.policy.observe_move(record["from"], self.level, record["seconds"])  # the engine waited for all of it
        self.recorder.finish(record, direction)

    def _apply(self, quantize: list, restore: list, level: int) -> dict:
        """One plan on every worker. With one rank, layers finished before a failure keep
        their new tier (each layer is whole either way). With several, a failure on any
        rank puts every rank back on the map they served before the plan: the plan
        commits on all ranks or on none."""
        before = {str(i): t for i, t in self.config.items()}
        try:
            results = self.rpc("morphserve_apply", quantize, restore)
        except Exception as e:  # each worker kept its layers whole; now one map for all
            if self.ranks > 1:
                self._agree(before)
            else:
                self.set_tiers(self.rpc("morphserve_tiers")[0])
            log.error("MorphServe: transition to %d failed (%s); serving at %d", level, e, self.level)
            raise MorphServeError(f"transition to {level} quantized layers failed: {e}") from e
        if not self._adopt([r["tiers"] for r in results], before):  # cannot happen without a bug
            raise MorphServeError(f"transition to {level}: the ranks reported different layer maps; rolled back")
        return results[0]

    def _adopt(self, maps: list[dict], fallback: dict | None = None) -> bool:
        """Take the ranks' layer maps if they are one map (True); otherwise put every rank on
        `fallback` (default rank 0's map) and return False: never serve two maps."""
        if all(m == maps[0] for m in maps):
            self.set_tiers(maps[0])
            return True
        self._agree(maps[0] if fallback is None else fallback)
        return False

    def _agree(self, target: dict) -> None:
        """Put every rank on `target` (layer -> tier) and take the map they then serve.
        If that fails too, every rank is brought to rank 0's map: one map in any case."""
        try:
            maps = [r["tiers"] for r in self.rpc("morphserve_set_tiers", target)]
        except Exception as e:
            log.error("MorphServe: rolling every rank back failed (%s); aligning them on rank 0's map", e)
            maps = self.rpc("morphserve_tiers")
            if any(m != maps[0] for m in maps):
                maps = [r["tiers"] for r in self.rpc("morphserve_set_tiers", maps[0])]
        self.set_tiers(maps[0])

    # -- moves prepared in the background ------------------------------------------------
    def _begin_background(self, layers: list, level: int, record: dict, t0: float, before_blocks: int,
                          direction: str) -> dict:
        """The workers prepare the layers' new tier in a thread while the model keeps
        running them as they are. A restore's KV is already shrunk to the target's
        capacity; a compression's grows when its last layer is installed."""
        try:
            self.rpc("morphserve_restore_begin", layers)
        except Exception as e:
            self.grow(self.capacity(self.level))  # every layer stayed as it was
            self.sync_view()
            raise MorphServeError(f"could not start the {direction} to {level}: {e}") from e
        record.update(mode="background", steps=0, committed_layer_ids=[])
        self.restoring = {"level": level, "record": record, "t0": t0, "before_blocks": before_blocks,
                          "commit_seconds": 0.0, "direction": direction}
        self.sync_view()
        return {"ok": True, "restoring": direction == "restore", "compressing": direction == "quantize",
                "quantized_layers": self.level, "changed": False}

    def commit_restore(self) -> None:
        """Install what the workers have prepared (a restore's or a compression's layers);
        raises TransitionFailed if the move stopped (layers already installed keep their
        new tier, the rest their old one)."""
        r = self.restoring
        t = time.monotonic()
        try:
            if self.ranks > 1:  # install only what every rank has ready: the same layers everywhere
                ready = min(self.rpc("morphserve_restore_ready"))
                results = self.rpc("morphserve_restore_commit", ready)
            else:
                results = self.rpc("morphserve_restore_commit")
        except Exception as e:
            raise self._stopped(f"commit failed: {e}") from e
        result = dict(results[0])
        errors = [r["error"] for r in results if r["error"]]
        result["error"] = "; ".join(errors) if errors else None
        result["done"] = all(r["done"] for r in results)
        r["commit_seconds"] += time.monotonic() - t
        r["record"]["steps"] += 1
        r["record"]["committed_layer_ids"] += result["committed"]
        self.set_tiers(result["tiers"])
        if result["error"]:
            raise self._stopped(result["error"])
        if result["done"]:
            self.restoring = None
            r["record"]["commit_seconds"] = r["commit_seconds"]
            self._give_back(r["level"])  # a compression's freed bytes become blocks now
            self.sync_view()
            self._finish(r["record"], r["before_blocks"], r["t0"], r["direction"])

    def _stopped(self, why: str) -> TransitionFailed:
        r = self.restoring
        return TransitionFailed(f"background {r['direction']} to {r['level']} stopped: {why}",
                                f"a background {r['direction']}")

    def _cancel_restore(self) -> None:
        r = self.restoring
        try:
            maps = [r["tiers"] for r in self.rpc("morphserve_restore_cancel")]
        except Exception as e:  # still `restoring`: recovery tries the cancel again
            raise MorphServeError(f"could not cancel the restore in progress: {e}") from e
        self.restoring = None
        self._adopt(maps)
        # Its time so far too: every record in the log says how long its move ran, and a
        # reader of a burst's end (explain) must not take a called-off move as instant.
        r["record"].update(cancelled=True, outcome="cancelled", to=self.level, seconds=time.monotonic() - r["t0"])
        self.recorder.write(r["record"])
        log.info("MorphServe: %s to %d called off at %d", r["direction"], r["level"], self.level)

    # -- failures --------------------------------------------------------------------
    def resync_after_failure(self) -> int:
        """Take the level the workers actually serve (each layer is wholly bf16 or W4: the
        workers roll back their own partial swaps) and give the KV pool its capacity."""
        self.pending_level = None
        if self.restoring is not None:
            self.restoring = None
            self._try_rpc("morphserve_restore_cancel")
        maps = self._try_rpc_all("morphserve_tiers")
        if maps is not None:  # a rank may have stopped part-way: one map for all
            self._try(lambda: self._adopt(maps), "aligning the ranks")
        cap = self.capacity(self.level)
        if self.pool.limit < cap:
            self.grow(cap)  # a shrink for a restore that did not happen is called off
        elif self.pool.limit > cap:  # fewer layers W4 than the pool was sized for
            self.recovery_shrink_from = self.pool.committed
            self.pool.set_limit(cap)
            self.finish_recovery_shrink()
        self.sync_view()
        return self.level

    def finish_recovery_shrink(self) -> None:
        """After a failed rollback left more bf16 layers than the pool was sized for, the
        blocks above the smaller capacity are hidden as they free (at each boundary, even
        while pinned) and their pages released once none is in use."""
        if self.recovery_shrink_from is None or self.pool.drain().done is False:
            return
        first, last = self.pool.committed + 1, self.recovery_shrink_from
        self.recovery_shrink_from = None
        if last >= first:
            self._try_rpc("morphserve_kv_release", first, last)

    def _try_rpc(self, method: str, *args):
        """A worker call during recovery: its failure is logged, not raised."""
        results = self._try_rpc_all(method, *args)
        return results[0] if results is not None else None

    def _try_rpc_all(self, method: str, *args):
        return self._try(lambda: self.rpc(method, *args), method)

    @staticmethod
    def _try(call, what: str):
        try:
            return call()
        except Exception as e:
            log.error("MorphServe: %s failed during recovery: %s", what, e)
            return None

    def kv_state(self) -> dict:
        r = self.restoring
        return {"pending_level": self.pending_level,
                "restoring_to": r["level"] if r and r["direction"] == "restore" else None,
                "compressing_to": r["level"] if r and r["direction"] == "quantize" else None,
                "deferred_restores": self.deferrals}
