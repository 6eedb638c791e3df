"""The policy loop: one signal sample per step boundary, one decision when the policy is
in charge. The policy itself (policies/) is plain Python; this module feeds it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from morphserve.runtime.recorder import Recorder
from policies import Decision, PolicyState, SignalTracker, load_policy, make_policy, make_tracker
from policies.config import (budget_below_level0, for_compiled_engine, log_ppl_ratios, prompt_twin_layers,
                             prompt_twin_min_tokens, resolve_budget)

log = logging.getLogger("morphserve")


class PolicyLoop:
    def __init__(self, sampler):
        self.policy = None
        self.name = "none"
        self.state = PolicyState()
        self.target: int | None = None
        self.tracker: SignalTracker | None = None
        self.sampler = sampler  # the boundary's StepSampler: it reads the scheduler
        self.signals = None
        self.sample = None  # the last boundary's own reading (signals average a window of them)
        self.expected_output_tokens = 256

    def start(self, ref: str, quality: dict | None, capacities: list[int], mix: list[dict[str, int]] | None = None,
              tier_speed: Callable[[], dict | None] | None = None, compiled: bool = False) -> None:
        """`quality`: the pack's quality.json as the served ladder sees it; `capacities`:
        usable KV blocks at each level 0..N; `mix`: layers per tier at each level;
        `tier_speed`: measures the tiers' kernel profile (called only if the policy uses it);
        `compiled`: the engine runs vLLM's compiled graph (policies.config.for_compiled_engine)."""
        pcfg, path = load_policy(ref)
        if compiled:
            pcfg, why = for_compiled_engine(pcfg)
            if why is not None:
                log.warning("MorphServe: %s", why)
        num_layers = len(capacities) - 1
        pcfg = resolve_budget(pcfg, quality, mix or [])
        cap = pcfg.level_cap(num_layers, quality)
        ratios = log_ppl_ratios(quality, num_layers) if pcfg.max_avg_ppl_increase is not None else None
        unreachable = budget_below_level0(pcfg, ratios)
        if unreachable is not None:
            log.warning("MorphServe: %s", unreachable)
        self.policy = make_policy(pcfg, capacities, cap, ratios)
        self.name = f"{pcfg.policy}:{path.stem}"
        profile = tier_speed() if tier_speed is not None and pcfg.policy == "demand" and pcfg.kernel_profile else None
        # Prompt twins: the ledger charges the steps they compute at max(level, N) and the
        # others at their level; the policy plans with the first (the steps to come are not
        # known), and its step model prices a prompt below N as one at N.
        min_tokens = prompt_twin_min_tokens(quality)
        plain = log_ppl_ratios(quality, num_layers, through_twins=False) if ratios is not None and min_tokens else None
        self.tracker = make_tracker(pcfg, num_layers, ratios, mix, profile, plain, min_tokens,
                                    prompt_twin_layers(quality))
        self.expected_output_tokens = pcfg.expected_output_tokens
        log.info("MorphServe: policy %s from %s, at most level %d, quality budget over time %s", pcfg.policy, path, cap,
                 f"{pcfg.max_avg_ppl_increase:.2%}" if pcfg.max_avg_ppl_increase is not None else "none")

    def count_only(self, twin_min_tokens: int) -> None:
        """Sample every boundary with no policy: a server holding prompt twins counts the
        tokens it served and which steps the twins computed (`served_tokens`)."""
        self.tracker = SignalTracker(twin_min_tokens=twin_min_tokens)

    @property
    def sampling(self) -> bool:
        return self.tracker is not None

    def observe(self, scheduler, pool, recorder: Recorder, level: int, charge: bool = True,
                stepped: bool = True) -> None:
        """Sample the scheduler at this boundary (also while a manual level is in force;
        `charge` False then: the quality ledger counts only tokens served under the policy).
        `stepped` False: a boundary for new arrivals, with no step since the last sample."""
        previous = self.signals
        sample = scheduler.sample(self.sampler, pool, self.expected_output_tokens)
        self.sample = sample
        self.signals = self.tracker.add(replace(sample, level=level, stepped=stepped), charge=charge)
        if stepped and previous is not None and previous.running and self.signals.running:
            recorder.step_seconds.append(self.signals.time - previous.time)

    def decide(self, level: int, recorder: Recorder, t0: float) -> Decision:
        """The policy's decision from `level` (the level the controller serves or is
        restoring to). Its new state counts only once the controller `accept`s it: a
        decision that was not carried out must not start a cooldown or reset the calm."""
        decision = self.policy.decide(self.signals, replace(self.state, level=level))
        recorder.decision_seconds.append(time.perf_counter() - t0)
        self.target = decision.target
        return decision

    def accept(self, decision: Decision) -> None:
        self.state = decision.state

    def observe_move(self, from_level: int, to_level: int, seconds: float) -> None:
        """A transition the engine waited for: the step-time model learns what one costs."""
        model = self.tracker.step_model if self.tracker is not None else None
        if model is not None and to_level != from_level:
            model.observe_move("up" if to_level > from_level else "down", abs(to_level - from_level), seconds)

    def step_model_dict(self) -> dict | None:
        """What the step-time model knows: the tiers' kernel profile and the fits learned."""
        model = self.tracker.step_model if self.tracker is not None else None
        return model.as_dict() if model is not None else None

    def signals_dict(self) -> dict | None:
        return self.signals.as_dict() if self.signals is not None else None

    def served_tokens(self) -> dict | None:
        """Tokens served since start-up at each level in force (`by_level`), and of those the
        ones in steps the prompt twins computed (`through_twins`): two readings apart give the
        exact quality charge of the tokens between them (morphserve evaluate takes them after
        its warm-up and after its replay). None while no sampler runs."""
        t = self.tracker
        if t is None:
            return None
        return {"by_level": {str(k): n for k, n in sorted(t.served_by_level.items())},
                "through_twins": {str(k): n for k, n in sorted(t.twin_served_by_level.items())},
                "twin_min_tokens": t.twin_min_tokens}
