"""Engine-core side of MorphServe: the controller façade.

It lives in the engine-core process, next to the scheduler and the executor, and owns
the level, the KV budget and the elastic block pool. Transitions run only at step
boundaries: from the post_step hook, or from a utility call (which vLLM handles between
steps on the same thread). Levels are rungs of the pack's ladder (morphserve.offline.ladder:
the W4A16 swap order, or W8A8 then W4A16 in a tiered pack); moves down are undone last-in-
first-out. The parts, one job each:
- kv_sizing: the budget equation and the KV blocks per level (start-up);
- policy_loop: signals at every boundary, the policy's decision;
- transitions: plans, executes and rolls back moves between levels (and shrink, the
  three ways a restore gets its KV blocks back);
- recorder: the transition log, counters, histogram.
It reaches vLLM only through the boundary's EngineLink and SchedulerView
(morphserve.vllm.engine, morphserve.vllm.scheduler).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from kv_resize.budget import KVBudget
from kv_resize.cold_tail import ColdTail
from kv_resize.elastic_pool import ElasticBlockPool
from morphserve.errors import MorphServeError
from morphserve.offline import kv_cost
from morphserve.offline import pack as packfmt
from morphserve.offline.ladder import Ladder, served_quality, with_prompt_twins
from morphserve.runtime.frontend_cpus import keep_off_workers
from morphserve.runtime.config import MorphConfig
from morphserve.runtime.heap_trimmer import BoundaryTrims, HeapTrimmer, trim_this_process
from morphserve.runtime.kv_sizing import plan_budget, rest_floor
from morphserve.runtime.manual_limit import SHARE_INVERSE, ManualRateLimit
from morphserve.runtime.policy_loop import PolicyLoop
from morphserve.runtime.prompt_twin_choice import choose_prompt_twins
from morphserve.runtime.recorder import Recorder
from morphserve.runtime.tier_speed import SLOW_BATCH, SLOW_FRACTION, slow_tiers
from morphserve.runtime.transitions import TransitionFailed, Transitions

log = logging.getLogger("morphserve")


# While steps run, the worker's memory figures are re-read at most this often (and after
# every change of tiers or KV pages); state reads and /metrics scrapes serve the last reading.
MEMORY_READ_EVERY_S = 5.0


def _transient(worker: dict | None) -> bool:
    """A reading taken while a cancelled restore's thread was still ending its last layer:
    that layer's bytes leave when the thread does, which changes nothing the controller
    sees, so such a reading is never served twice."""
    return bool(worker and worker.get("finishing_restores"))


def largest_per_layer(readings: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Per tier and layer, the most any rank holds: the budget must hold on every rank (an
    even split makes them equal)."""
    out: dict[str, list[int]] = {}
    for reading in readings:
        for tier, per_layer in (reading or {}).items():
            out[tier] = [max(a, b) for a, b in zip(out[tier], per_layer)] if tier in out else list(per_layer)
    return out


def read_kernel_profile(engine, tier_names: list[str], group_size: int | None) -> tuple[dict, str] | None:
    """(tier -> batch -> seconds of one layer's linears, the dtype timed in), measured by
    rank 0 (cached per machine: morphserve.runtime.tier_speed); None if it cannot be."""
    try:
        reading = engine.rpc("morphserve_tier_speed", tier_names, group_size or 32)[0]  # W8A8-only packs: no group
    except Exception as e:  # a figure for the policy, not serving: start without it
        log.warning("MorphServe: timing the tiers' kernels failed (%s); the policy learns step times "
                    "from served steps only", e)
        return None
    dtype = reading.get("dtype", "bfloat16")
    log.info("MorphServe: tier kernel speed in %s, %s", dtype, reading["source"])
    return {t: {int(b): float(x) for b, x in v.items()} for t, v in reading["seconds"].items()}, dtype


class MorphController:
    idle_tick_s = 0.1
    floor = 0  # the lowest level served (kv_sizing.rest_floor); set with the scheduler
    trims_say_busy = False  # heap trim mode "idle": the workers gate a trim asked for under load

    def __init__(self, config: MorphConfig, engine, manifest: packfmt.Manifest, sampler,
                 held_tier_bytes: dict[str, list[int]] | None = None):
        """`engine` is the boundary's EngineLink; `sampler` its StepSampler;
        `held_tier_bytes` what the workers' kernels hold per layer and tier (overrides the
        manifest's checkpoint bytes in the budget)."""
        self.config = config
        self.engine = engine
        self.manifest = manifest
        self.ladder = Ladder.from_manifest(manifest, config.tiers, held_tier_bytes)  # the tiers this CPU serves
        self.order = list(dict.fromkeys(r.layer for r in self.ladder.rungs))
        self.recorder = Recorder(config.transition_log, {"prompt_twin_layers": config.prompt_twin_layers}
                                 if config.prompt_twin_layers else None)
        self.loop = PolicyLoop(sampler)
        self.moves: Transitions | None = None  # set once the scheduler exists
        self.budget: KVBudget | None = None
        self.pool: ElasticBlockPool | None = None
        self.cold: ColdTail | None = None  # set with the pool (kv_resize.cold_tail)
        self.scheduler = None
        self.kernel_profile_dtype: str | None = None  # set once the tiers' kernels are timed
        self.slow_tiers: dict[str, float] = {}  # served tiers slower than full precision under load (tier_speed)
        self.forced_level: int | None = None
        self.admission_cap: int | None = None  # the policy's limit on requests running at once (None: vLLM's)
        self.admission_changes = 0
        self.token_budget: int | None = None  # the policy's tokens per step while requests decode (None: vLLM's)
        self.errors = 0
        self.last_error: dict | None = None
        self.pinned_by_error = False
        self.manual_limit = ManualRateLimit(self.config.manual_min_interval_s)
        self.commits_on_touch = True  # the workers' KV backing; set from morphserve_init
        self._memory: tuple[float, tuple, dict | None] = (float("-inf"), (), None)  # (when, key, figures)
        self.ranks = 1  # tensor-parallel workers; the budget is shared out among them
        self.rank_weight_bytes: int | None = None  # one rank's weights at full precision
        self.prompt_twin_bytes = 0  # one rank's resident prompt twins (the most any rank holds)
        self.prompt_twins_auto: str | None = None  # with prompt_twin_layers auto: what it chose, and why
        self.frontend_cpus: dict | None = None  # where the engine core and API server run (runtime.frontend_cpus)
        self.start_profile: tuple[dict, str] | None = None  # the kernel profile auto read (reused by the policy)
        self.memory_reads = 0
        # the workers' heap trims at step boundaries (mode "boundary"; a "thread" worker trims by itself)
        self.heap_trims = BoundaryTrims(config.heap_trim_interval_s if config.heap_trim_mode != "thread" else 0.0)
        self.trims_say_busy = config.heap_trim_mode == "idle"
        # the engine core's own heap, frontend mode "idle": trimmed here at idle moments (mode "thread": its thread)
        idle_trims = config.frontend_heap_trim_mode == "idle"
        self.own_trims = BoundaryTrims(config.frontend_heap_trim_interval_s if idle_trims else 0.0)
        self.own_trimmer = HeapTrimmer(config.frontend_heap_trim_interval_s, mode="boundary")

    @classmethod
    def start(cls, raw_config: dict, engine, sampler) -> "MorphController":
        config = MorphConfig.model_validate(raw_config)
        manifest = packfmt.load_manifest(Path(config.pack))
        profile, auto = None, None
        if config.prompt_twin_layers == "auto":  # the twins are built in morphserve_init: decide first
            profile = read_kernel_profile(engine, Ladder.from_manifest(manifest, config.tiers).tier_names,
                                          manifest.group_size)
            choice = choose_prompt_twins(profile[0] if profile else None, manifest.num_layers, config.tiers,
                                         config.twin)
            log.info("MorphServe: prompt twins auto: %s", choice.why)
            config, auto = config.model_copy(update={"prompt_twin_layers": choice.layers}), choice.why
        results = engine.rpc("morphserve_init", config.model_dump())
        log.info("MorphServe: %d swappable layers loaded on %d worker(s) in %.1f s (%s backend)",
                 results[0]["layers"], len(results), results[0]["seconds"], results[0]["backend"])
        controller = cls(config, engine, manifest, sampler, largest_per_layer([r["held_tier_bytes"] for r in results]))
        controller.commits_on_touch = results[0]["commits_on_touch"]
        controller.prompt_twins_auto, controller.start_profile = auto, profile
        controller.ranks = len(results)
        try:
            controller.frontend_cpus = keep_off_workers(config.frontend_cpus, results)
        except Exception as e:  # where processes run is a courtesy to the workers: never a failed start
            log.warning("MorphServe: the engine core stays where it is (%s: %s)", type(e).__name__, e)
        if config.frontend_heap_trim_mode == "thread":  # the engine core's own heap (the API server's: its app)
            trim_this_process(config.frontend_heap_trim_interval_s)
        controller.rank_weight_bytes = max(r["weight_bytes"] for r in results)
        controller.prompt_twin_bytes = max(r.get("prompt_twin_bytes", 0) for r in results)
        if not any(r.get("heap_trim_available", True) for r in results):
            controller.heap_trims = BoundaryTrims(0.0)  # no worker can trim: no call every interval for nothing
        if controller.prompt_twin_bytes:
            log.info("MorphServe: prompt twins resident for the first %d layers of the ladder (%.1f MiB per rank, "
                     "steps of %d+ tokens)", config.prompt_twin_layers, controller.prompt_twin_bytes / 2**20,
                     config.prompt_twin_min_tokens)
        return controller

    @property
    def num_layers(self) -> int:
        """The top level: the number of rungs (swappable layers, twice that with tiers)."""
        return self.ladder.top

    @property
    def quantized(self) -> list[int]:
        return self.moves.quantized if self.moves is not None else []

    # -- start-up: KV sizing ---------------------------------------------------------
    def plan_kv(self, fp16_kv_bytes: int, block_bytes: int) -> int:
        """Fix the budget from vLLM's measurement; return the KV bytes to reserve."""
        self.budget = plan_budget(self.ladder.savings, self.config.memory_budget_gb, self.engine.model_path,
                                  fp16_kv_bytes, block_bytes, self.ranks,
                                  self.rank_weight_bytes if self.ranks > 1 else None, self.engine.dtype,
                                  self.prompt_twin_bytes)
        return self.budget.reserve_bytes()

    def attach_scheduler(self, scheduler) -> None:
        """Called as the scheduler is built (before EngineCore.scheduler is even set), with
        the boundary's SchedulerView over it."""
        scheduler.check_single_group()
        store = scheduler.block_store()
        self.max_usable = store.num_usable
        twin_rungs = self.config.prompt_twin_layers if self.prompt_twin_bytes else 0
        self.floor = rest_floor([self.capacity(k) for k in range(self.num_layers + 1)], scheduler.block_size,
                                self.engine.max_model_len, twin_rungs)
        self.budget = replace(self.budget, floor=self.floor)
        cap0 = max(1, self.capacity(0))  # the pool needs a block; with a floor above 0 it grows there at once
        self.scheduler = scheduler
        if not self.commits_on_touch:  # the null block and level 0's blocks are mapped before any use
            self.engine.rpc("morphserve_kv_commit", 0, cap0)
        self.pool = ElasticBlockPool(store, cap0)
        rest = self.capacity(self.floor)
        # Blocks beyond the rest capacity are used last and their pages handed back once free
        # (a backing whose pages commit on first write only: there, written is resident).
        self.cold = ColdTail(rest, cache_grace_s=self.config.kv_cold_cache_grace_s) \
            if self.commits_on_touch and self.capacity(self.ladder.top) > rest and self.config.kv_cold_tail == "on" \
            else None
        self.moves = Transitions(self.ladder, self.engine.rpc, self.pool, scheduler, self.capacity, self.recorder,
                                 self.loop, self.config.shrink_strategy, self.commits_on_touch, self.ranks)
        if self.floor:
            # Before the first request: the floor's rungs are twinned, so this installs their
            # resident twins and frees full precision (no build), then grows the pool.
            self.moves.to(self.floor, reason=f"floor: {self.prompt_twin_bytes / 2**20:.1f} MiB of prompt twins leave "
                                             f"{self.capacity(0)} KV blocks at level 0, short of max_model_len")
            log.info("MorphServe: resting at level %d (the floor): %d KV blocks there, %d at level 0", self.floor,
                     rest, self.capacity(0))
        self.moves.sync_view()
        if self.config.policy:
            self.loop.start(self.config.policy, self.served_quality(),
                            [self.capacity(k) for k in range(self.num_layers + 1)],
                            [self.ladder.counts(k) for k in range(self.num_layers + 1)], self.tier_speed,
                            compiled=self.config.compile)
        elif self.prompt_twin_bytes:
            # no policy, but prompt twins: the boundaries still count the tokens served and which
            # steps the twins computed (`served_tokens`), so any run can be charged exactly
            self.loop.count_only(self.config.prompt_twin_min_tokens)

    def tier_speed(self) -> dict[str, dict[int, float]] | None:
        """Each served tier's kernel speed here (seconds per layer's linears by batch), for
        the policy's step-time model; None if it cannot be measured (the model then learns
        from served steps alone)."""
        profile = self.start_profile or read_kernel_profile(self.engine, self.ladder.tier_names,
                                                            self.manifest.group_size)
        if profile is None:
            return None
        seconds, self.kernel_profile_dtype = profile
        # Said, not acted on: the user built this pack's tiers. Served on a Zen 5 EPYC (W4A16 at
        # 0.48x bf16), three W4A16 layers bought 2 KV blocks over all-W8A8's 54 and cost 2-15%
        # more worker CPU per token (docs/RESULTS.md, suite-v4-zen5d).
        self.slow_tiers = slow_tiers(seconds, self.ladder.tier_names)
        for tier, speed in self.slow_tiers.items():
            log.warning("MorphServe: the pack's %s tier runs at %.2fx full precision's speed at batch %d here "
                        "(< %.2f): its rungs buy KV blocks at a TPOT cost, exactly under load; `--tiers %s` serves "
                        "without it, the ladder `prepare --tiers auto` builds on this CPU", tier, speed, SLOW_BATCH, SLOW_FRACTION,
                        ",".join(t for t in self.ladder.tier_names if t != "bf16" and t not in self.slow_tiers))
        return seconds

    def served_quality(self) -> dict | None:
        """The pack's quality.json as the served ladder sees it (some tiers may be off here)."""
        path = Path(self.config.pack) / packfmt.QUALITY
        quality = json.loads(path.read_text()) if path.exists() else None
        quality = served_quality(quality, self.manifest.tier_names, self.ladder.tier_names)
        if quality is not None and self.config.prompt_twin_layers:
            quality = with_prompt_twins(quality, self.config.prompt_twin_layers, self.config.prompt_twin_min_tokens)
        dtype = getattr(self.engine, "kv_cache_dtype", "auto")
        if quality is not None and dtype != "auto":
            entry = kv_cost.load(Path(self.config.pack), dtype, self.ladder.tier_names, self.ladder.top)
            if entry is None:
                log.warning("MorphServe: the quality budget counts weights only: this %s KV cache's own perplexity "
                            "cost is not measured for this pack here (morphserve pack kv-cost)", dtype)
            else:
                factors = kv_cost.entry_factors(entry)
                quality = {**quality, "kv_cost": {"dtype": dtype, "factor_by_level": {str(k): f for k, f in
                                                                                      factors.items()}}}
                log.info("MorphServe: the quality budget charges the %s KV cache's measured cost (%+.2f%% at level 0)",
                         dtype, 100 * (factors[0] - 1))
        return quality

    @property
    def background_restores(self) -> bool:
        """Policy-driven restores prepare layers in a worker thread (restore_mode)."""
        return self.config.restore_mode == "background"

    def background_compress(self) -> bool:
        """A policy-driven compression goes to a worker thread (compress_mode) only while
        requests are decoding: they are the ones a synchronous move would stall. With none,
        moving at once lets the prompts about to be computed run on the new rung."""
        sample = self.loop.sample  # this boundary's own count: the signals average a window
        return self.config.compress_mode == "background" and sample is not None and sample.running > 0

    def capacity(self, level: int) -> int:
        return min(self.budget.usable_blocks(level), self.max_usable)

    # -- step boundary -------------------------------------------------------------
    def wants_idle_ticks(self) -> bool:
        """Idle boundaries matter only while something could still be restored, or where
        the policy moves up while idle (`idle_rest: next_request`)."""
        moves = self.moves
        if moves.restoring is not None or moves.recovery_shrink_from is not None:
            return True  # prepared layers (or a recovery's shrink) progress at boundaries, idle ones too
        return self.loop.policy is not None and self.forced_level is None and (
            moves.level > self.floor or moves.pending_level is not None or self.loop.policy.moves_while_idle())

    def on_idle(self) -> None:
        """An idle moment (no step to run): a boundary for the policy while it may still
        restore, and the heap trims owed by the last steps (the workers', and in frontend
        mode "idle" the engine core's own)."""
        self.trim_own_heap_if_due()
        if self.wants_idle_ticks():
            self.on_step_boundary(stepped=False)
        else:
            self.trim_heap_if_due()

    def trim_own_heap_if_due(self) -> None:
        """The engine core's own freed heap, handed back while it has nothing to schedule
        (frontend mode "idle"): malloc_trim here takes milliseconds, so no step waits on it."""
        if not self.own_trims.due() or not self.own_trimmer.available:
            return
        try:
            self.own_trimmer.trim_once()
        except Exception:  # memory, not serving: never into vLLM's loop
            log.exception("MorphServe: the engine core's own heap trim failed")
        finally:
            self.own_trims.done()

    def trim_heap_if_due(self, busy: bool = False) -> None:
        """The workers hand their freed heap back between two steps, never inside one
        (morphserve.runtime.heap_trimmer): one worker call once the interval has passed.
        `busy`: a boundary between two steps, not an idle moment (mode "idle" says so)."""
        if not self.heap_trims.due():
            return
        try:
            if self.trims_say_busy:
                self.engine.rpc("morphserve_trim_heap", busy)
            else:
                self.engine.rpc("morphserve_trim_heap")
        except Exception:  # memory, not serving: never into vLLM's loop
            log.exception("MorphServe: the workers' heap trim failed")
        finally:
            self.heap_trims.done()

    def on_step_boundary(self, stepped: bool = True) -> None:
        """`stepped` False: an idle tick (no step since the last boundary)."""
        t0 = time.perf_counter()
        try:
            self._step_boundary(stepped)
        finally:
            if stepped:
                self.recorder.boundary_done(time.perf_counter() - t0)

    def _step_boundary(self, stepped: bool) -> None:
        moves = self.moves
        try:
            if moves.recovery_shrink_from is not None and moves.restoring is None:
                moves.finish_recovery_shrink()
            if moves.restoring is not None:
                try:
                    moves.commit_restore()
                except TransitionFailed as e:
                    self._recover(e, e.during)
            if self.loop.sampling:
                self._decide()
            if moves.pending_level is not None and moves.restoring is None:  # a part-way restore finishes first
                level = moves.pending_level
                if level == moves.level:
                    moves.pending_level = None
                else:
                    # A deferred manual restore stays synchronous, as the request asked.
                    moves.to(level, reason="pending",
                             background=self.forced_level is None and self.background_restores)
        except Exception as e:  # nothing may escape into vLLM's engine loop: it would kill the engine
            self._recover(e, "a step-boundary transition")
        try:
            self.keep_tail_cold()
        except Exception:  # memory, not serving: never into vLLM's loop
            log.exception("MorphServe: keeping the KV tail cold failed")
        try:
            self.refresh_memory_if_due()
        except Exception:  # a figure, not serving: never into vLLM's loop
            log.exception("MorphServe: reading the worker's memory failed")
        if stepped:
            self.heap_trims.stepped()
            self.own_trims.stepped()
        self.trim_heap_if_due(busy=stepped)

    def keep_tail_cold(self, now: float | None = None) -> None:
        """The cold tail's work at a boundary (kv_resize.cold_tail), only while the pool is
        not changing size: a shrink's draining range and a restore's blocks are the
        transitions' own."""
        pool, moves = self.pool, self.moves
        if self.cold is None or pool.limit != pool.committed or moves.restoring is not None \
                or moves.recovery_shrink_from is not None:
            return
        now = time.monotonic() if now is None else now
        self.cold.order(pool.store, pool.limit, now)
        runs = self.cold.to_release(pool.store, pool.limit, now)
        if runs:
            self.engine.rpc("morphserve_kv_release_runs", [list(r) for r in runs])

    def on_arrivals(self) -> None:
        """Requests were queued since the last boundary and the next step would schedule
        them: the policy sees them first, so a long prompt is computed on a rung fast enough
        for it rather than on the rung it found. Only a move up is carried out here;
        restores, holds and pending moves belong to step boundaries."""
        if not (self.loop.sampling and self.loop.policy is not None and self.forced_level is None):
            return
        t0 = time.perf_counter()
        try:
            self._decide(stepped=False)
        except Exception as e:  # nothing may escape into vLLM's engine loop
            self._recover(e, "a transition for new arrivals")
        finally:
            self.recorder.boundary_done(time.perf_counter() - t0)

    def _decide(self, stepped: bool = True) -> None:
        self._decide_level(stepped)
        self.admit(self.moves.level if self.forced_level is None else None)

    def _decide_level(self, stepped: bool) -> None:
        t0 = time.perf_counter()
        moves = self.moves
        self.loop.observe(self.scheduler, self.pool, self.recorder, moves.level, charge=self.forced_level is None,
                          stepped=stepped)
        if self.forced_level is not None or self.loop.policy is None:
            return
        # The policy reasons from where the controller is going: a restore under way (or
        # waiting for blocks) has already given up its KV capacity.
        # A part-way restore (under way while the rest waits) heads for the level pending.
        heading = moves.pending_level if moves.pending_level is not None else (
            moves.restoring["level"] if moves.restoring is not None else moves.level)
        decision = self.loop.decide(heading, self.recorder, t0)
        clamped = decision.target < self.floor
        if clamped:
            decision = replace(decision, target=self.floor, reason=f"{decision.reason}; held at the floor {self.floor}")
        self.recorder.note_decision(self.loop.signals.time if self.loop.signals else 0.0, heading, decision, stepped)
        if not stepped and decision.target <= heading:
            # An arrival boundary only moves up, before the new prompts are scheduled. Its
            # queue is the requests that just arrived, which the next step admits: that is
            # no reason to hold or to restart the calm a restore waits for.
            return
        if decision.target != heading:
            # a restore in progress is retargeted (cancelled where it stands, then moved on)
            moves.to(decision.target, reason=decision.reason, background=self.background_restores,
                     background_compress=self.background_compress())
        elif clamped:
            # a restore below the floor that changes nothing: no cooldown starts, the calm
            # it waited for stays as it was
            return
        self.loop.accept(decision)  # only now: a failed move leaves the policy's state as it was

    def admit(self, level: int | None) -> None:
        """Set vLLM's admission limit and tokens per step to the policy's cap and budget at
        the level served (None, or no policy in charge: vLLM's own). Only a change reaches the
        scheduler."""
        in_charge = level is not None and self.loop.policy is not None and self.forced_level is None
        cap = self.loop.policy.admission(self.loop.signals, level) if in_charge else None
        if cap != self.admission_cap:
            self.scheduler.set_admission_cap(cap)
            self.admission_cap = cap
            self.admission_changes += 1
        budget = self.loop.policy.token_budget(self.loop.signals, level) if in_charge else None
        if budget != self.token_budget:
            self.scheduler.set_token_budget(budget)
            self.token_budget = budget

    # -- failures --------------------------------------------------------------------
    def _recover(self, error: BaseException, during: str) -> None:
        """After any failure: serve the level the workers actually serve, with its KV
        capacity, and pin it, so the policy does not retry a failing transition at every
        step. An operator unpins with POST {"quantized_layers": null}."""
        try:
            self.errors += 1
            log.error("MorphServe: %s failed: %s", during, error, exc_info=not isinstance(error, MorphServeError))
            level = self.moves.resync_after_failure()
            self.forced_level, self.pinned_by_error = level, True
            self.last_error = {"time": time.time(), "during": during, "error": f"{type(error).__name__}: {error}",
                               "serving_level": level}
            self.recorder.write({"time": time.time(), "outcome": "failed", "during": during,
                                 "error": self.last_error["error"], "to": level, "policy": self.loop.name})
        except Exception:  # the last line: log, never raise into vLLM
            log.critical("MorphServe: recovery after %s failed; level and KV view may disagree", during,
                         exc_info=True)

    # -- control surface -------------------------------------------------------------
    def set_level_request(self, level, rate_limited: bool = False) -> dict:
        """POST /morphserve/level: an int forces a level (policy paused); None hands control back.
        Requests over HTTP (`rate_limited`) may change the level at most once per
        manual_min_interval_s: each costs decode steps, so a caller in a loop could stall serving."""
        if level is None:
            self.forced_level, self.pinned_by_error = None, False
            return {"ok": True, **self.state()}
        if isinstance(level, bool) or not isinstance(level, int) or not self.floor <= level <= self.num_layers:
            floor = f" (below {self.floor} the resident prompt twins leave too few KV blocks)" if self.floor else ""
            return {"ok": False, "status": 400,
                    "error": f"level must be an integer in {self.floor}..{self.num_layers} (the ladder's rungs{floor}), "
                             f"got {level!r}"}
        started = time.monotonic()
        wait = self.manual_limit.wait_s(started)
        if rate_limited and wait > 0 and level != self.moves.level:
            interval = self.config.manual_min_interval_s
            return {"ok": False, "status": 429, "retry_after_s": round(wait, 3),
                    "error": f"manual level changes are limited to one per {interval} s, and to "
                             f"{100 // SHARE_INVERSE}% of the engine's time (manual_min_interval_s); "
                             f"retry in {wait:.2f} s"}
        self.forced_level, self.pinned_by_error = level, False
        try:
            result = self.moves.to(level, reason="manual")
        except Exception as e:
            self._recover(e, f"manual transition to {level}")
            return {"ok": False, "status": 503, **self.state(),
                    "error": f"transition to {level} failed (every layer stayed whole); serving at "
                             f"{self.moves.level} quantized layers: {e}"}
        finally:
            if rate_limited:
                self.manual_limit.charge(started, time.monotonic())
            self.refresh_memory_if_due()
        return {**result, **self.state()}

    # -- observability -----------------------------------------------------------------
    def kv_state(self) -> dict:
        block_size = self.scheduler.block_size
        return {
            "kv_capacity_blocks": self.pool.visible,
            "kv_capacity_tokens": self.pool.visible * block_size,
            "kv_committed_blocks": self.pool.committed,
            "kv_target_blocks": self.pool.limit,
            "kv_reserved_blocks": self.max_usable,
            "kv_free_blocks": self.pool.store.num_free(),
            "memory_budget_bytes": self.budget.budget_bytes,  # one rank's under tensor parallelism
            "memory_budget_total_bytes": self.budget.budget_bytes * self.ranks,
            "tensor_parallel_size": self.ranks,
            "kv_blocks_by_level": [self.capacity(k) for k in range(self.num_layers + 1)],
            "shrink_strategy": self.moves.shrink_strategy,
            # blocks above this id are the cold tail (kv_resize.cold_tail); None: no cold tail
            "kv_cold_above": None if self.cold is None else self.cold.warm,
            **self.moves.kv_state(),
        }

    # -- the worker's memory figures ----------------------------------------------------
    def _memory_key(self) -> tuple:
        """What changes the worker's figures: the layers' tiers, a restore's progress, the
        KV pages committed. Checked at every step boundary, so it compares counters, not the
        layer map itself."""
        m, r = self.moves, self.moves.restoring
        return (m.config_version, None if r is None else len(r["record"]["committed_layer_ids"]),
                self.pool.committed, m.recovery_shrink_from)

    def read_memory(self, kv_resident: bool = False) -> dict:
        """One worker call. Only here: vLLM's worker busy-waits on its queue for 1 s after
        any call, so reading per scrape kept a core spinning for every scraper."""
        try:
            readings = self.engine.rpc("morphserve_memory", kv_resident)
            worker = {**readings[0], "per_rank": readings} if len(readings) > 1 else readings[0]
        except Exception as e:  # a state read must not fail because one figure could not be read
            worker = {"error": f"worker memory query failed: {e}"}
        self._memory = (time.monotonic(), self._memory_key(), worker)
        self.memory_reads += 1
        return worker

    def refresh_memory_if_due(self) -> None:
        """After anything that changed the figures, and every MEMORY_READ_EVERY_S while
        steps run; an idle server is never asked."""
        at, key, worker = self._memory
        if key != self._memory_key() or time.monotonic() - at >= MEMORY_READ_EVERY_S or _transient(worker):
            self.read_memory()

    def memory_state(self, kv_resident: bool = False) -> dict:
        """The budget equation: weights (as computed with, in whichever precision) +
        resident twins + bf16 layers prepared by a background restore and not yet installed
        + committed KV pages <= budget. Weights and RSS come from the worker's last reading
        (`read_age_s` old; see refresh_memory_if_due), `kv_resident` reads anew; the KV
        figure is live and counts every block that may hold pages (the committed ids and
        vLLM's null block)."""
        if kv_resident or self._memory[2] is None or _transient(self._memory[2]):
            self.read_memory(kv_resident)
        at, _, worker = self._memory
        if "error" in worker:
            return {"error": worker["error"]}
        kv = (self.pool.committed + 1) * self.budget.block_bytes  # one rank's: each rank holds its heads' share

        def equation(w: dict) -> dict:
            accounted = w["weights_bytes"] + w["twin_bytes"] + w["prepared_bytes"] + kv
            return {"budget_bytes": self.budget.budget_bytes, "weights_bytes": w["weights_bytes"],
                    "twin_bytes": w["twin_bytes"], "prepared_bytes": w["prepared_bytes"], "kv_bytes": kv,
                    "accounted_bytes": accounted, "within_budget": accounted <= self.budget.budget_bytes,
                    "kv_resident_bytes": w["kv_resident_bytes"] if kv_resident else None,
                    "rss_anon_bytes": w["rss_anon_bytes"], "rss_file_bytes": w["rss_file_bytes"],
                    "split_layers": w.get("split_layers", []), "heap_trim": w.get("heap_trim")}

        out = {**equation(worker), "read_age_s": round(time.monotonic() - at, 3), "reads": self.memory_reads,
               "ranks": self.ranks}
        if "per_rank" in worker:  # tensor parallelism: the equation holds per rank, and in total
            per_rank = [equation(w) for w in worker["per_rank"]]
            total = {k: sum(r[k] for r in per_rank) for k in ("budget_bytes", "weights_bytes", "twin_bytes",
                                                              "prepared_bytes", "kv_bytes", "accounted_bytes",
                                                              "rss_anon_bytes", "rss_file_bytes")}
            out.update(per_rank=per_rank, total={**total, "within_budget": all(r["within_budget"] for r in per_rank)},
                       within_budget=all(r["within_budget"] for r in per_rank),
                       split_layers=sorted({i for r in per_rank for i in r["split_layers"]}))
        return out

    def brief_state(self) -> dict:
        """What a replay's timeline polls twice a second: read on the engine's thread between
        two steps, so it is kept to the few figures the timeline keeps."""
        return {"active": True, "level": self.moves.level, "quantized_layers": self.moves.level,
                "kv_capacity_blocks": self.pool.visible, "admission_cap": self.admission_cap,
                "token_budget": self.token_budget}

    def state(self, kv_resident: bool = False, memory: bool = True) -> dict:
        """`memory` False: leave out the worker's memory figures (a worker call each)."""
        return {
            "active": True,
            "pack": self.config.pack,
            "twin": self.config.twin,
            "level": self.moves.level,  # the rung of the ladder served now (0: every layer bf16)
            "max_level": self.num_layers,  # the ladder's top (2L with two tiers)
            "floor": self.floor,  # the lowest level served (above 0 only with prompt twins that need it)
            "prompt_twin_layers": self.config.prompt_twin_layers,  # resolved, where it was auto
            "prompt_twins_auto": self.prompt_twins_auto,  # what auto chose and why (None: not auto)
            "frontend_cpus": self.frontend_cpus,  # the engine core's and API server's CPUs, off the workers'
            "engine_core_heap_trim": ({**self.own_trimmer.report(), "mode": "idle"}
                                      if self.own_trims.interval_s > 0 else None),  # frontend mode idle only
            "quantized_layers": self.moves.level,  # deprecated name of `level`, kept one release
            "swappable_layers": len(self.order),
            "levels": self.num_layers,  # deprecated name of `max_level`
            "quantized_layer_ids": list(self.moves.quantized),
            "swap_order": self.order,
            "layer_tiers": {str(i): t for i, t in sorted(self.moves.config.items())},
            "tier_counts": self.moves.tier_counts(),
            "tiers": ["bf16", *self.ladder.tier_names],
            "pack_tiers": ["bf16", *self.manifest.tier_names],
            "forced_level": self.forced_level,
            "admission_cap": self.admission_cap,  # requests admitted at once (None: vLLM's own limit)
            "admission_changes": self.admission_changes,
            "token_budget": self.token_budget,  # tokens per step while requests decode (None: vLLM's own)
            **self.kv_state(),
            "memory": self.memory_state(kv_resident) if memory else None,
            "policy": "manual" if self.forced_level is not None else self.loop.name,
            "policy_target": self.loop.target,
            "policy_max_level": self.loop.policy.max_level if self.loop.policy else None,
            "signals": self.loop.signals_dict(),
            "served_tokens": self.loop.served_tokens(),
            "step_model": self.loop.step_model_dict(),
            # the arithmetic the step model's kernel profile was timed in: the engine's dtype
            "kernel_profile_dtype": self.kernel_profile_dtype,
            "slow_tiers": self.slow_tiers,  # tier -> speed against full precision at batch 32, where < 0.67
            "decision_us": self.recorder.decision_us(),
            "boundary_us": self.recorder.boundary_us(),  # all the controller did between steps
            "recent_decisions": list(self.recorder.decisions),
            "errors": self.errors,
            "last_error": self.last_error,
            "pinned_by_error": self.pinned_by_error,
            **self.recorder.as_dict(),
        }
