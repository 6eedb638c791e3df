"""Demand: serve the highest-quality rung of the ladder whose KV capacity covers the
demand and whose predicted step meets the TPOT SLO, and go there in one transition.

Demand, in KV blocks: what the running and waiting requests will hold when they finish
(prompt + expected output), plus the requests that arrive over `horizon_s` faster than the
running ones finish. A burst is seconds old by the time a staircase of `step_layers`
arrives, so the target is reached in one plan.

The choice, over the levels the quality limits allow (lowest level = best quality first):
- capacity: capacity >= demand x (1 + headroom);
- speed: the step-time model (policies.step_model: a kernel profile measured at start-up
  plus steps served) predicts the decode step at that level with the batch its capacity
  admits, times what prefill chunks add now (the last window's mean step over the model's
  decode-only prediction at the level served); it must stay under tpot_slo x slo_margin.
  A level the model cannot predict passes, unless the steps already break the bound: then
  nothing is known to help, and more admissions only add prefills between everyone's tokens;
- prompts: the prompt tokens not yet computed must prefill at that level within
  ttft_slo x slo_margin (the step model's prompt cost, from the kernel profile and the
  prefill steps served; without a profile the test passes).
  The controller also decides when requests arrive, before they are scheduled, so a long
  prompt is computed on a rung fast enough for it rather than on the rung it found.
The first level meeting all three is where a move up starts; it goes on past it, within the
quality limits, while each further rung computes the batch that level would serve faster
still (the step model's prediction, at least FURTHER_GAIN faster in all) and holds at least
as much: where int8 decodes faster than bf16, once load makes bf16 insufficient the W8A8
rungs are taken whole (a partial W8A8 level is slower and smaller than all-W8A8, and a burst
whose demand grows as it arrives climbed them in a staircase of moves: 0 -> 12 -> 15 -> 18 ->
30 in 5 s on a 2-vCPU AMD EPYC). Their quality cost stays inside the budget over time. So
where int8 decodes faster than bf16, load that bf16 cannot serve in time rests on W8A8
rungs; calm load returns to bf16; bursts past the W8A8 rungs' capacity climb into W4A16
rungs; and where a tier is slower, the same rule finds that by measurement (no rung is
faster, so the move stops at the first level that meets the tests). If no level meets all three: where no level prefills the waiting prompts in
time, among the levels that hold the demand the one that gets through the work in the system
soonest (the prompts' prefill and the output tokens still expected, decoded at the batch the
level admits: a prefill a few percent faster is no gain at a rung that decodes 3x slower),
staying where it is unless that gains FURTHER_GAIN; else the one with the most
capacity whose step (and prompts, where some level can) still meet their bounds, else the
one that computes a request soonest (its prompt and its share of the decode steps: a rung
that decodes batch 1 faster can prefill 3x slower), else the top. In each of these, a level taken for its capacity must
spare the decodes beside the prompts it admits (`spares_decodes`): where prompts are long
and outputs short, a bigger batch turns the requests it serves sooner into TPOT failures.

Quality limits, tightest first: the hard cap (fraction, layers, max_ppl_increase), then the
budget over time (`max_avg_ppl_increase`, token-weighted over `quality_window_s`): a level
is allowed while serving the next horizon's tokens at it keeps the window's average inside
the budget, and a level whose own cost is within the budget is always allowed (serving it
can only bring an over-spent average back), so a spent budget lowers the level to that
floor, never to bf16 under load.

Under load a move down does not wait for calm where the rung below holds the demand and
computes a request at least SPEED_DOWN_GAIN sooner (`speed_down`): a compute-bound window
never gives calm, and a slower rung held for it slows every request. Other restores (to any
lower level) need an empty queue held for `calm_s`, and go to the first
level that meets the same tests with the wider margins: capacity >= present demand x
(1 + restore_headroom), predicted step <= tpot_slo x restore_margin. The gaps between the
margins are the hysteresis, and a restore is judged by the step predicted *at the level it
goes to*, so relief that brought the step under the bound is not undone by it. Where no level
meets those margins, a restore still goes to the best-quality level that holds the demand
and computes the present work faster than the level served (`faster_below`): a slower rung
is not held for a speed it does not give.

A prompt's time at another level counts the move there (the engine waits for a transition:
its seconds per layer are learned from the transitions timed, `StepTimeModel.observe_move`):
a move for a prefill 4% faster that itself takes a quarter of the prefill makes the first
token later, not sooner.
"""

from __future__ import annotations

import math
from dataclasses import replace

from policies.admission import admission_cap, kv_admission_cap, step_at
from policies.step_budget import step_token_budget
from policies.base import Decision, PolicyBase, PolicyState

# A move up goes past its first sufficient rung only for a step at least this much faster:
# a kernel profile's noise (a few % between repetitions) must not buy quality loss.
FURTHER_GAIN = 0.05
# A move down under load needs this much speed (a request computed sooner): less than a move
# up needs, since it buys quality too, and more than nothing, since rungs the model cannot
# tell apart (no profile, or one tier) are no reason to move while a burst grows.
SPEED_DOWN_GAIN = 0.01
# What `further`'s reason carries when the slack stopped the climb short of the run's top
# (the calm restore reads it, so the two words cannot drift apart).
SLACK_MARK = "(further_slack)"
# How closely the quality ledger and the evaluation's token-weighted figure agree on one run
# (0.1 percentage point, checked on a real replay by tests/test_evaluate_e2e.py).
LEDGER_TOLERANCE = 0.001


class DemandPolicy(PolicyBase):
    name = "demand"

    def __init__(self, cfg, capacity_by_level: list[int], max_level: int, log_ratios: list[float] | None = None):
        super().__init__(cfg, capacity_by_level, max_level)
        self.ratios = list(log_ratios[: len(capacity_by_level)]) if log_ratios is not None else None

    # -- the terms ---------------------------------------------------------------------
    def demand_blocks(self, s, projected: bool = True) -> float:
        """`projected`: add the arrivals over the horizon that outpace completions. One
        arrival moves the rate estimate by 1 / window_s, so a surplus below that is noise,
        not load, and is not projected (else it alone could hold layers quantized)."""
        present = max(s.need_blocks, s.used_blocks + s.waiting_blocks)
        if not projected:
            return present
        per_request = s.need_per_request or s.blocks_per_request or 1.0
        step = s.step_time_s or 0.05
        finishing = s.running / max(s.remaining_tokens * step, 1e-3) if s.running else 0.0  # requests/s
        surplus = s.arrival_rate - finishing - 1.0 / self.cfg.window_s
        return present + max(0.0, surplus) * self.cfg.horizon_s * per_request

    def quality_limit(self, s) -> int:
        """The highest level the budget over time allows: one where serving the next
        horizon's tokens keeps the window's average inside the budget, and always one whose
        own cost is within the budget (no cliff to bf16 once the budget is spent). A jump
        is one plan, so a level is judged by its own cost, not by the levels below it."""
        budget = self.cfg.max_avg_ppl_increase
        if budget is None or self.ratios is None or s.ledger is None:
            return self.max_level
        upcoming = max(s.token_rate, 1.0) * self.cfg.horizon_s
        limit = math.log1p(budget) + 1e-12
        # a level dearer than the budget spends banked quality, and only down to the
        # tolerance the ledger and the evaluation agree within: the ledger at the budget
        # could otherwise read a hair over it in the evaluation (+2.86% against static
        # W8A8's +2.84% on a development window)
        banked = max(budget - LEDGER_TOLERANCE, 0.0)
        return max((k for k in range(0, self.max_level + 1)
                    if self.ratios[k] <= limit or s.ledger.allows(self.ratios[k], upcoming, banked)), default=0)

    def batch_at(self, s, level: int, projected: bool = True) -> float:
        """Requests in the batch at `level`: all that want service, as far as its KV holds them."""
        per_request = s.need_per_request or s.blocks_per_request or 1.0
        wanting = s.running + s.queue_len + (s.arrival_rate * self.cfg.horizon_s if projected else 0.0)
        return max(1.0, min(wanting, self.capacity[level] / per_request))

    def admission(self, s, level: int) -> int | None:
        """The most requests that may run at once at `level` (policies.admission): the lower
        of the TPOT cap (`admission_cap`) and the KV cap (`kv_admission`), each where it is
        on; None for no cap."""
        if s is None:
            return None
        capacity = self.capacity[max(0, min(level, len(self.capacity) - 1))]
        caps = []
        if self.cfg.admission_cap:
            per_request = s.need_per_request or s.blocks_per_request or 1.0
            caps.append(admission_cap(s.step_model, level, self.cfg.tpot_slo_s * self.cfg.slo_margin,
                                      s.prompt_tokens_per_request, s.output_tokens_per_request,
                                      capacity / per_request))
        if self.cfg.kv_admission:
            caps.append(kv_admission_cap(capacity, s.running_now, s.running_need_blocks, s.waiting_needs))
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def token_budget(self, s, level: int) -> int | None:
        """Tokens the next step may schedule at `level` (policies.step_budget), where
        `step_token_budget` is on; None: vLLM's own budget."""
        if s is None or not self.cfg.step_token_budget:
            return None
        return step_token_budget(s.step_model, level, self.cfg.tpot_slo_s * self.cfg.slo_margin, s.running_now)

    def prefill_factor(self, s) -> float:
        """What prefill chunks add now: the last window's mean step over the model's
        decode-only prediction at the level served (1 when it cannot tell)."""
        model = s.step_model
        if model is None or not s.running or not model.known(s.level):
            return 1.0
        here = model.predict(s.level, max(1.0, s.running))
        return s.step_time_s / here if here and s.step_time_s > here else 1.0

    def predicted_step(self, s, level: int, projected: bool = True, factor: float | None = None) -> float | None:
        """The step requests would feel at `level`: decode at its batch, times what prefill
        chunks add now (`factor`, if already computed). A level never served borrows a
        lower one's fit (see StepTimeModel); None before any data."""
        model = s.step_model
        step = model.predict(level, self.batch_at(s, level, projected)) if model is not None else None
        if step is None:
            return None
        return step * (self.prefill_factor(s) if factor is None else factor)

    def slower_kernels(self, s, level: int, than: float | None) -> bool:
        """Does `level` compute the present batch more slowly than `than` seconds (the
        reference level's prediction at that batch)?"""
        model = s.step_model
        a = model.predict(level, max(1.0, float(s.running))) if model is not None else None
        return a is not None and than is not None and a > than * 1.01

    def work_at(self, s, level: int, current: int, projected: bool = True) -> float | None:
        """`work_seconds` at `level`: at the batch its KV admits, its move from `current` counted."""
        return self.work_seconds(s, level, self.prompt_seconds(s, level, current), self.batch_at(s, level, projected))

    def through_sooner(self, s, level: int, current: int, here: float | None, projected: bool = True) -> bool:
        """Does `level` get through the work in the system at least FURTHER_GAIN sooner than
        `here` (`current`'s `work_at`)? Where every level admits the whole batch this is only
        a kernel race."""
        there = self.work_at(s, level, current, projected)
        return there is not None and here is not None and there <= here * (1 - FURTHER_GAIN)

    def step_beside_prompts(self, s, level: int, projected: bool = True) -> float | None:
        """The step a request in `level`'s batch feels with the other requests' prompts
        computed beside it: the decode step at the batch the level admits, plus each other
        member's prefill spread over one request's output tokens (chunked prefill puts a
        prompt into the steps that decode everyone else, and a batch turns over about once
        per request's output, so each request sees about one prompt per other member). Where
        prompts are long and outputs short (the code trace: 333 prompt tokens for 21 output
        tokens) that term is what a bigger batch costs every request in it; where outputs
        are long (the conv trace: 224 for 142) it is small. The decode step alone where the
        requests' sizes or a prompt's cost are not known; None where the decode is not."""
        model = s.step_model
        if model is None:
            return None
        return step_at(model, level, self.batch_at(s, level, projected), s.prompt_tokens_per_request,
                       s.output_tokens_per_request)

    def spares_decodes(self, s, level: int, reference: int, bound: float, projected: bool = True) -> bool:
        """Does `level` keep the step beside the prompts it admits (`step_beside_prompts`)
        within `bound`, or no slower than `reference` keeps it? A level taken for its
        capacity admits more prompts at once; where their prefill stalls every decode beside
        them past the bound, the requests it serves sooner break TPOT instead of TTFT
        (measured: an fp32 engine on an AVX2-only EPYC, code trace, climbed to all-W8A8 for
        the work through sooner; 49 of 55 requests broke TPOT against plain fp32's 16)."""
        there = self.step_beside_prompts(s, level, projected)
        ref = self.step_beside_prompts(s, reference, projected)
        return there is None or there <= max(bound, ref if ref is not None else 0.0) * (1 + 1e-9)

    def prompt_seconds(self, s, level: int, current: int | None = None) -> float | None:
        """Seconds until the prompts not yet computed are, at `level` (None: not known yet):
        from `current`, the move there first (the engine waits for it; not counted until a
        transition was timed)."""
        model = s.step_model
        if model is None or not s.pending_prompt_tokens:
            return 0.0
        prefill = model.prefill_seconds(level, s.pending_prompt_tokens)
        move = model.move_seconds(current, level) if current is not None and prefill is not None else None
        return prefill if move is None else prefill + move

    def work_seconds(self, s, level: int, prompt_s: float | None, batch: float) -> float | None:
        """Seconds `level` takes for the work in the system: the prompts not yet computed
        (`prompt_s`, their time there) and the output tokens still expected, decoded at
        `batch` (at least one step). Weighed where the SLO tests cannot decide: a rung that
        prefills a few percent faster can decode several times slower (int8 in an fp32
        engine on an AVX2-only EPYC: measured 2.5-3.6x), and every request waiting feels the
        decode as much as the prefill. None: not predicted."""
        model = s.step_model
        step = model.predict(level, batch) if model is not None else None
        if prompt_s is None or step is None:
            return None
        return prompt_s + step * max(1.0, s.pending_output_tokens / batch)

    def choose(self, s, current: int, demand: float, headroom: float, top: int, bound: float,
               projected: bool = True, prompt_bound: float | None = None) -> tuple[int, str, bool]:
        """(level, why, meets every test) among 0..top, from `current`. `why` starts with what
        decided: capacity (the first level whose KV covers the demand), speed (lower levels
        cover it but are too slow, for the decode step or for the prompts waiting: their
        prefill must fit `prompt_bound`) or quality (the limits stop below what is needed)."""
        unknown_ok = s.step_time_s <= bound  # steps already too slow: an unpredicted level is no help
        factor = self.prefill_factor(s)  # the same for every level: computed once per decision
        levels = range(0, top + 1)
        covers = {k: self.capacity[k] >= demand * (1 + headroom) for k in levels}
        # Predicted lazily, level by level from the bottom, while the search below can still
        # stop: it runs at every step boundary, where vLLM's worker waits for it, and the
        # first level that meets every test is usually found long before the top (at light
        # load, level 0). Each figure is computed as before; only the ones not read are not.
        steps: dict[int, float | None] = {}
        prompts: dict[int, float | None] = {}
        quick: dict[int, bool] = {}
        prompt_ok: dict[int, bool] = {}

        def passes(k: int) -> bool:
            if k not in quick:
                step = steps[k] = self.predicted_step(s, k, projected, factor)
                quick[k] = (step <= bound) if step is not None else unknown_ok
            if not quick[k]:
                return False
            if k not in prompt_ok:
                if prompt_bound is not None:
                    prompts[k] = self.prompt_seconds(s, k, current)
                prompt_ok[k] = prompts.get(k) is None or prompts[k] <= prompt_bound
            return prompt_ok[k]

        for k in levels:
            if covers[k] and passes(k):
                slow_below = [j for j in range(k) if covers[j] and not (quick[j] and prompt_ok[j])]
                speed = f", predicted step {steps[k]:.3f}s <= {bound:.3f}s" if steps[k] is not None else ""
                if prompts.get(k):
                    speed += f", its {s.pending_prompt_tokens} prompt tokens in {prompts[k]:.2f}s <= {prompt_bound:.2f}s"
                skipped = (f" (levels below are too slow for {bound:.3f}s per step or {prompt_bound or 0:.2f}s "
                           f"for the prompts)" if slow_below else "")
                return k, (f"{'speed' if slow_below else 'capacity'}: demand {demand:.0f} blocks "
                           f"(+{headroom:.0%}) fits {self.capacity[k]} at level {k}{speed}{skipped}"), True
        # no level met every test: the fallbacks below weigh every level
        steps = {k: steps[k] if k in steps else self.predicted_step(s, k, projected, factor) for k in levels}
        if prompt_bound is not None:
            prompts = {k: prompts[k] if k in prompts else self.prompt_seconds(s, k, current) for k in levels}
        quick = {k: (steps[k] <= bound) if steps[k] is not None else unknown_ok for k in levels}
        prompt_ok = {k: prompts.get(k) is None or prompts[k] <= prompt_bound for k in levels}
        limited = "quality" if top < len(self.capacity) - 1 else None  # a cap or the budget stopped the ladder
        # Capacity that does not cover the demand leaves a queue anyway: it is not bought
        # with slower kernels (measured: a 4-bit rung taken for 2 more blocks admitted more
        # prefills and broke TTFT where all-W8A8 held).
        model = s.step_model
        reference = model.predict(current, max(1.0, float(s.running))) if model is not None else None
        hopeless = bool(prompts) and not any(prompt_ok.values())  # more prompt than any level computes in time
        if hopeless:
            # among the levels that hold the demand, the one that gets through the work in the
            # system soonest (its prompts and the output still expected) shortens every wait
            here = min(current, top)
            timed = {k: w for k in steps if covers[k] and quick[k] and self.spares_decodes(s, k, here, bound, projected)
                     and (w := self.work_seconds(s, k, prompts[k], self.batch_at(s, k, projected))) is not None}
            if timed:
                k = min(timed, key=lambda j: (timed[j], j))
                if here in timed and k != here and timed[k] > timed[here] * (1 - FURTHER_GAIN):
                    k = here  # within the noise of the profile: no quality is spent on it
                return k, (f"speed: {s.pending_prompt_tokens} prompt tokens waiting; no level computes them within "
                           f"{prompt_bound:.2f}s; of the levels that hold demand {demand:.0f} blocks, {k} gets "
                           f"through them and {s.pending_output_tokens} output tokens soonest "
                           f"({prompts[k]:.2f}s + {timed[k] - prompts[k]:.2f}s)"), False
        # A slower rung is still taken where its capacity gets the work through sooner: where
        # KV holds the batch back, more blocks admit a bigger batch, and slower steps over
        # it can finish the queue first (before, an fp32 engine on an AVX2-only EPYC, where
        # every W8A8 rung is slower per step, could only stay at level 0 here, 8 blocks for
        # two requests, however long its queue).
        here = self.work_at(s, current, current, projected)

        def fast(k: int) -> bool:
            step = steps[k]
            return (step is not None and step <= bound and (prompt_ok[k] or hopeless)
                    and (not self.slower_kernels(s, k, reference)
                         or (self.through_sooner(s, k, current, here, projected)
                             and self.spares_decodes(s, k, current, bound, projected))))

        # the highest level that passes, searched from the top: this runs at every step
        # boundary of a compute-bound server, where vLLM's worker waits for it
        k = next((j for j in reversed(steps) if fast(j)), None)
        if k is not None:
            sooner = ""
            if self.slower_kernels(s, k, reference):
                sooner = (f"; its kernels are slower, but its {self.capacity[k]} blocks get the work in the system "
                          f"through sooner ({self.work_at(s, k, current, projected):.1f}s against {here:.1f}s at "
                          f"level {current})")
            return k, (f"{limited or 'speed'}: level {k} has the most capacity ({self.capacity[k]} blocks for demand "
                       f"{demand:.0f}) whose step meets {bound:.3f}s ({steps[k]:.3f}s){sooner}"), False
        known = [k for k, step in steps.items() if step is not None]
        if known:
            k, stay = self.fastest_for_requests(s, known, steps, min(current, top))
            # Every level breaks the bound: the one that gets the work in the system through
            # soonest, where KV holds the batch back (the fastest step was level 0 for an fp32
            # engine on an AVX2-only EPYC, the level with the least KV, and its queue grew).
            # Not where the prompts it admits would stall the decodes beside them past what
            # the fastest level's do: those requests would break TPOT instead of TTFT. Only
            # levels whose KV admits a bigger batch than k's compete: between levels admitting
            # the same batch the work is a kernel race, which `fastest_for_requests` settled
            # with the arriving prompts counted (the work in the system may hold none).
            wider = self.batch_at(s, k, projected) * (1 + 1e-9)
            timed = {j: w for j in known if (j == k or self.batch_at(s, j, projected) > wider)
                     and (w := self.work_at(s, j, current, projected)) is not None}
            if k in timed:
                best = min(timed, key=lambda j: (timed[j], j))
                spared = {j: w for j, w in timed.items() if self.spares_decodes(s, j, k, bound, projected)}
                kept = min(spared, key=lambda j: (spared[j], j))  # k spares its own decodes: never empty
                if timed[kept] <= timed[k] * (1 - FURTHER_GAIN):
                    return kept, (f"speed: compute-bound at every level; {kept} gets the work in the system through "
                                  f"soonest ({timed[kept]:.1f}s against {timed[k]:.1f}s at {k}, the fastest step)"), False
                if timed[best] <= timed[k] * (1 - FURTHER_GAIN):
                    stall, ref = self.step_beside_prompts(s, best, projected), self.step_beside_prompts(s, k, projected)
                    at_k = f"{ref:.3f}s at {k}" if ref is not None else f"{bound:.3f}s allowed"
                    return k, (f"speed: compute-bound at every level; the fastest is {k} (predicted step "
                               f"{steps[k]:.3f}s); {best} would get the work through sooner ({timed[best]:.1f}s "
                               f"against {timed[k]:.1f}s), but the prompts it admits would stall the decodes "
                               f"beside them ({stall:.3f}s a token against {at_k})"), False
            return k, (f"speed: compute-bound at every level; the fastest is {k} (predicted step {steps[k]:.3f}s)"
                       f"{stay}"), False
        if not unknown_ok:
            return min(current, top), (f"speed: compute-bound, mean step {s.step_time_s:.3f}s > {bound:.3f}s, "
                                       f"and no level is known to be faster"), False
        return top, (f"{limited or 'capacity'}: demand {demand:.0f} blocks; no level up to {top} covers it, "
                     f"{top} has the most capacity"), False

    def request_seconds(self, s, level: int, batch: float) -> float | None:
        """Compute seconds one request costs at `level` where the CPU is what runs out: its
        prompt (the mean prompt's tokens at the level's prefill cost) and its share of the
        decode steps at `batch` (the expected output's tokens x the step / batch). A rung that
        decodes a small batch faster can prefill several times slower, and in a compute-bound
        window every arriving prompt pays that (a Zen 4 EPYC: W4A16 0.44 against W8A8's 0.62 ms
        a layer at batch 1, 3.3x W8A8's cost at 256 prompt tokens; ranked by the decode step
        alone, a server took 3 W4A16 layers at batch 1-2 and fell behind static W8A8 for the
        rest of the window, docs/RESULTS.md "dev-zen4-compute-steps and -b"). The decode step
        alone where a request's size or a prompt's cost is not known (the same for every level:
        one profile, one set of signals)."""
        model = s.step_model
        step = model.predict(level, batch) if model is not None else None
        if step is None:
            return None
        if s.prompt_tokens_per_request <= 0 or s.output_tokens_per_request <= 0:
            return step
        prompt = model.prefill_seconds(level, s.prompt_tokens_per_request)
        return step if prompt is None else prompt + step * s.output_tokens_per_request / batch

    def fastest_for_requests(self, s, known: list[int], steps: dict, here: int) -> tuple[int, str]:
        """(the level among `known` to serve, what the reason adds): the one that computes a
        request soonest at the present batch (`request_seconds`), unless that is a move up
        from `here` for less than FURTHER_GAIN: the profile's noise must not buy quality loss
        (the fallback moved 30 -> 33 for ~2% of predicted step). A lower level is named for
        any gain; under load `speed_down` then takes it for SPEED_DOWN_GAIN (it buys quality
        as well), and a move back up needs FURTHER_GAIN, so the two cannot alternate on one
        prediction."""
        batch = max(1.0, float(s.running))
        cost = {j: self.request_seconds(s, j, batch) for j in known}
        priced = [j for j in known if cost[j] is not None]
        if not priced:
            return min(known, key=lambda j: (steps[j], j)), ""
        k = min(priced, key=lambda j: (cost[j], j))
        if here in priced and k > here and cost[here] * (1 - FURTHER_GAIN) <= cost[k]:
            return here, (f"; staying at {here}: it computes a request in {cost[here]:.2f}s, within "
                          f"{FURTHER_GAIN:.0%} of {k}'s {cost[k]:.2f}s")
        if s.prompt_tokens_per_request > 0 and s.output_tokens_per_request > 0:
            return k, (f"; {k} computes a request ({s.prompt_tokens_per_request:.0f} prompt tokens, "
                       f"{s.output_tokens_per_request:.0f} output tokens at batch {batch:.0f}) in {cost[k]:.2f}s")
        return k, ""

    def speed_down(self, s, state: PolicyState, target: int, fits: bool, reason: str) -> Decision | None:
        """A move down under load, where a rung below computes a request sooner: without
        it a lower, faster rung waited for calm, which a compute-bound window never gives (a
        Zen 4 EPYC held 3 W4A16 layers for 93 s "waiting for calm" while every prompt paid
        their slower prefill). Goes to where a move up from `target` would stop (`further`,
        below the level served) when `target` meets every test, else to `target`. Guards
        against flapping: the rung must hold the demand with the move-up headroom and compute
        a request (`request_seconds`) SPEED_DOWN_GAIN faster than the level served, while a
        move up needs FURTHER_GAIN; the cooldown applies. None: no such move."""
        level, batch = state.level, max(1.0, float(s.running))
        to = self.further(s, target, level - 1, batch=batch)[0] if fits else target
        if to >= level or self.capacity[to] < self.demand_blocks(s) * (1 + self.cfg.headroom):
            return None
        there, here = self.request_seconds(s, to, batch), self.request_seconds(s, level, batch)
        if there is None or here is None or there > here * (1 - SPEED_DOWN_GAIN):
            return None
        return self._down_to(state, s.time, to,
                             f"speed: under load, level {to} computes a request in {there:.2f}s against "
                             f"{here:.2f}s at level {level} and holds the demand ({reason})", need_calm=False)

    def _costs(self, s, level: int, batch: float) -> tuple[float | None, float | None]:
        """(decode step at `batch`, seconds per prompt token) the step-time model predicts
        at `level`; a term it cannot predict is None."""
        model = s.step_model
        if model is None:
            return None, None
        return model.predict(level, batch), model.prefill_seconds(level, 1.0)

    @staticmethod
    def _faster(upper: tuple, lower: tuple) -> bool:
        """Is a rung with costs `upper` faster than one with `lower`: neither term slower
        (a term not predicted counts as equal) and one of them faster?"""
        pairs = [(u, d) for u, d in zip(upper, lower) if u is not None and d is not None]
        eps = 1e-9  # equal costs summed in another order differ in the last bits
        return bool(pairs) and all(u <= d * (1 + eps) for u, d in pairs) and any(u < d * (1 - eps) for u, d in pairs)

    def _run_top(self, s, first: int, top: int, batch: float) -> int:
        """The top of the run of rungs from `first` (within `top`), each faster than the one
        below it (`_faster`) and holding no fewer blocks."""
        k, here = first, self._costs(s, first, batch)
        while k < top and self.capacity[k + 1] >= self.capacity[k]:
            nxt = self._costs(s, k + 1, batch)
            if not self._faster(nxt, here):
                break
            k, here = k + 1, nxt
        return k

    def _gains(self, s, lower: int, upper: int, batch: float) -> tuple[float, float]:
        """How much faster `upper` computes a decode step at `batch` and a prompt token than
        `lower` (fractions; 0 where not predicted)."""
        (du, pu), (dl, pl) = self._costs(s, upper, batch), self._costs(s, lower, batch)
        decode = 1 - du / dl if du is not None and dl else 0.0
        prompt = 1 - pu / pl if pu is not None and pl else 0.0
        return decode, prompt

    def further(self, s, first: int, top: int, batch: float | None = None) -> tuple[int, str]:
        """How far past `first` (the first level meeting every test) a move up goes: up the
        rungs, within `top`, while each computes the work faster than the one below it (a
        decode step at `batch`, default the batch `first` would serve, and a prompt token:
        neither slower) and holds no fewer blocks; `first` unless that gains FURTHER_GAIN on
        one of the two. The prompt term matters: prefill is where int8 gains most (its
        kernels win by more at hundreds of tokens than at a decode batch), and time to first
        token is what a light load feels."""
        batch = self.batch_at(s, first) if batch is None else batch
        run_top = self._run_top(s, first, top, batch)
        k, ref = self._within_slack(s, first, run_top, batch)
        if k == first:
            return first, ""
        decode, prompt = self._gains(s, first, k, batch)
        if max(decode, prompt) < FURTHER_GAIN:
            return first, ""
        slack = (f", within {self.cfg.further_slack:.0%} of level {ref}'s speed {SLACK_MARK}"
                 if k < run_top else "")
        return k, (f"; on to level {k}: {self.capacity[k]} blocks, a decode step {decode:.0%} and a prompt token "
                   f"{prompt:.0%} faster at batch {batch:.0f}{slack}")

    def _within_slack(self, s, first: int, run_top: int, batch: float) -> tuple[int, int]:
        """The lowest rung from `first` to `run_top` whose decode step and prompt token are
        each within `further_slack` of the speed of the run's own top, past any cap on
        `run_top` (a term not predicted counts as within): along a run each rung is faster
        than the one below, so the first found keeps the most layers in full precision. The
        reference is the uncapped top so that a climb capped at the level served finds that
        level again, not one a slack lower at every calm boundary. `run_top` where the slack
        is 0. Returns (the rung, the run's uncapped top)."""
        slack = self.cfg.further_slack
        if not slack or run_top == first:
            return run_top, run_top
        ref = self._run_top(s, run_top, self.max_level, batch)
        best = self._costs(s, ref, batch)
        for j in range(first, run_top):
            costs = self._costs(s, j, batch)
            if all(c is None or b is None or c <= b * (1 + slack) for c, b in zip(costs, best)):
                return j, ref
        return run_top, ref

    def faster_below(self, s, level: int, demand: float) -> tuple[int, str, bool] | None:
        """When no level meets the restore margins: the best-quality level below `level`
        that holds `demand` with the restore headroom and gets through the present work (the
        prompts pending and the output expected at the present batch: `work_seconds`) at
        least FURTHER_GAIN sooner. The margins keep a level that relief made fast enough
        from being undone by a slower one; a level slower than one below it buys nothing but
        its capacity (measured: an fp32 engine on an AVX2-only EPYC held level 13 for 190 s,
        decoding ~40% slower than at level 0, because level 0's step did not meet the restore
        margin either)."""
        batch = max(1.0, float(s.running))
        here = self.work_seconds(s, level, self.prompt_seconds(s, level), batch)
        if here is None:
            return None
        for j in range(level):
            if self.capacity[j] < demand * (1 + self.cfg.restore_headroom):
                continue
            there = self.work_seconds(s, j, self.prompt_seconds(s, j), batch)
            if there is not None and there <= here * (1 - FURTHER_GAIN):
                return j, (f"speed: no level meets the restore margins; level {j} holds demand {demand:.0f} blocks "
                           f"and gets through the present work in {there:.2f}s against {here:.2f}s at level "
                           f"{level}"), True
        return None

    def segment_start(self, s, level: int) -> int:
        """The lowest level of the run of rungs, up to `level`, each faster than the one
        below it at the present batch (where `further` would take a move up from there):
        `level` itself when the run gains less than FURTHER_GAIN or nothing is predicted."""
        batch = max(1.0, float(s.running))
        j, here = level, self._costs(s, level, batch)
        while j > 0 and self._faster(here, self._costs(s, j - 1, batch)):
            j, here = j - 1, self._costs(s, j - 1, batch)
        return j if j < level and max(self._gains(s, j, level, batch)) >= FURTHER_GAIN else level

    # -- the decision ----------------------------------------------------------------------
    def decide(self, s, state: PolicyState) -> Decision:
        if s.running > 0 or s.queue_len > 0 or s.pending_prompt_tokens > 0:
            state = replace(state, busy_at=s.time)
        decision = self._decide(s, state)
        return replace(decision, state=replace(decision.state, busy_at=state.busy_at))

    def resting(self, s, state: PolicyState) -> bool:
        """Within `fast_rest_idle_s` of the last request: the faster run is where it rests.
        With `idle_rest: next_request` also after it, at the batch an idle server's next
        request brings (1): a move up made at that request's first boundary stalls its
        first tokens (measured on a Zen 4 EPYC: 0.6-1.0 s for 0 -> 30, made right after the
        prompt of an 8-token request), while one made while idle stalls nobody, and idle
        time serves no token the quality budget could be spent on."""
        return self.recently_busy(s, state) or self.moves_while_idle()

    def recently_busy(self, s, state: PolicyState) -> bool:
        """A request within `fast_rest_idle_s` (the reasons tell this rest from an idle one)."""
        idle = self.cfg.fast_rest_idle_s
        return idle is not None and s.time - state.busy_at < idle

    def moves_while_idle(self) -> bool:
        """An idle server may still move up (to where its next request would be moved), so
        the controller gives it idle boundaries at its floor too."""
        return self.cfg.fast_rest_idle_s is not None and self.cfg.idle_rest == "next_request"

    def _decide(self, s, state: PolicyState) -> Decision:
        c, now, level = self.cfg, s.time, state.level
        quality_top = self.quality_limit(s)
        if level > self.max_level:
            return self._down(state, now, True, "above the quality cap")
        if level > quality_top:  # the budget over time is spent: come down even under load
            return self._down_to(state, now, quality_top,
                                 f"quality budget: {s.quality_increase:.1%} average increase, "
                                 f"{c.max_avg_ppl_increase:.1%} allowed; at most level {quality_top}",
                                 need_calm=False)
        target, reason, fits = self.choose(s, level, self.demand_blocks(s), c.headroom, quality_top,
                                           c.tpot_slo_s * c.slo_margin, prompt_bound=c.ttft_slo_s * c.slo_margin)
        resting = self.resting(s, state)
        if target > level:
            # only from a level that meets every test: a fallback (most capacity whose step
            # meets the bound) already found the rungs above it too slow at their own batch
            on = ""
            if fits:
                target, on = self.further(s, target, quality_top)
            return self._up(state, now, target, reason + on, blocked=s.waiting_blocks > 0)
        if resting and fits:
            # the run of faster rungs above the sufficient level, for the batch served now
            rest, on = self.further(s, target, quality_top, batch=max(1.0, float(s.running)))
            if rest > level and s.pending_prompt_tokens:
                # not needed for any SLO: a move now would hold up the prompts waiting by
                # the move's time (0.36 s against a 0.14 s prefill on the light suite-v4
                # row's first request), for a gain of a fraction of their prefill; it
                # waits for a boundary with every prompt computed, where it stalls a
                # decode step instead
                return Decision(level, f"hold: {reason}{on}; the move waits until the {s.pending_prompt_tokens} "
                                       f"prompt tokens pending are computed", replace(state, calm_since=None))
            why_rest = ("resting there while requests come" if self.recently_busy(s, state) else
                        "waiting there for the next request (idle_rest: next_request)")
            if rest > level:
                return self._up(state, now, rest, f"speed: {reason}{on}; {why_rest}",
                                blocked=s.waiting_blocks > 0)
            if rest == level and rest > target:
                return Decision(level, f"hold: {reason}{on}; {why_rest}",
                                replace(state, calm_since=None))
        if target == level:
            return Decision(level, f"hold: {reason}", replace(state, calm_since=None))
        calm = self._restore(s, state, resting)
        if calm.target < level or not (s.running > 0 or s.queue_len > 0):
            return calm
        # the calm restore holds under load; a rung below that is no slower need not wait
        down = self.speed_down(s, state, target, fits, reason)
        if down is None:
            return calm
        # a move, or the cooldown it waits out (the calm path's state: no calm began here)
        return down if down.target < level else replace(down, state=calm.state)

    def _restore(self, s, state: PolicyState, resting: bool) -> Decision:
        """The calm restore: a move down for quality once the queue has been empty for
        `calm_s`, to where the wider margins hold; a hold (its calm clock kept) otherwise."""
        c, now, level = self.cfg, s.time, state.level
        # lower: only after calm, and to where the wider margins still hold
        present = self.demand_blocks(s, projected=False)
        lower, why, fits = self.choose(s, level, present, c.restore_headroom, level,
                                       c.tpot_slo_s * c.restore_margin, projected=False,
                                       prompt_bound=c.ttft_slo_s * c.restore_margin)
        if not fits:
            faster = self.faster_below(s, level, present)
            if faster is not None:
                lower, why, fits = faster
        if fits and (resting or self.segment_start(s, lower) < lower):
            # `lower` is inside a run of rungs each faster than the one below (no level under
            # it passes), or requests still come and a run of faster rungs starts at it: a
            # move up from there would go on through the run again, so the restore stops at
            # the run's top, or nowhere if the level served is that top
            top, on = self.further(s, lower, level, batch=max(1.0, float(s.running)))
            if top >= level:
                if not resting:
                    why_hold = f"{lower} lies inside a run of faster rungs ending at {level}"
                elif self.recently_busy(s, state):
                    why_hold = (f"requests came within {c.fast_rest_idle_s:g}s, and the run of faster rungs from "
                                f"{lower} ends at {level}")
                else:
                    why_hold = (f"idle, and the next request would be moved up the run of faster rungs from {lower} "
                                f"to {level} (idle_rest: next_request)")
                return Decision(level, f"hold: calm, but {why_hold}", replace(state, calm_since=None))
            if top != lower:
                where = ("the rung within further_slack of the top of the run of faster rungs it lies in"
                         if SLACK_MARK in on else "the top of the run of faster rungs it lies in")
                lower, why = top, f"{why}; up to {top}, {where}"
        safe = fits and lower < level and s.queue_len == 0 and s.waiting_blocks == 0
        return self._down_to(state, now, lower if safe else level, f"calm: {why}")
