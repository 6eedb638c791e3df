"""The policy loop: one signal sample per step boundary, one decision when the policy is
in charge. The policy itself (policies/) is plain Python; this module feeds it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from morphserve.runtime.recorder import Recorder
from policies import Decision, PolicyState, SignalTracker, load_policy, make_policy

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

    def start(self, ref: str, pack_dir: Path, capacities: list[int]) -> None:
        """`capacities`: usable KV blocks at each level 0..N."""
        pcfg, path = load_policy(ref)
        quality_file = pack_dir / "quality.json"
        quality = json.loads(quality_file.read_text()) if quality_file.exists() else None
        num_layers = len(capacities) - 1
        cap = pcfg.level_cap(num_layers, quality)
        self.policy = make_policy(pcfg, capacities, cap)
        self.name = f"{pcfg.policy}:{path.stem}"
        self.tracker = SignalTracker(pcfg.window_s)
        log.info("MorphServe: policy %s from %s, at most %d quantized layers", pcfg.policy, path, cap)

    @property
    def sampling(self) -> bool:
        return self.tracker is not None

    def observe(self, scheduler, pool, recorder: Recorder) -> None:
        """Sample the scheduler at this boundary (also while a manual level is in force)."""
        previous = self.signals
        self.signals = self.tracker.add(scheduler.sample(self.sampler, pool))
        if previous is not None and previous.running and self.signals.running:
            recorder.step_seconds.append(self.signals.time - previous.time)

    def decide(self, level: int, recorder: Recorder, t0: float) -> Decision:
        decision = self.policy.decide(self.signals, replace(self.state, level=level))
        recorder.decision_seconds.append(time.perf_counter() - t0)
        self.state, self.target = decision.state, decision.target
        return decision

    def signals_dict(self) -> dict | None:
        return self.signals.as_dict() if self.signals is not None else None
