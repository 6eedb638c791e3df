"""The signal tracker keeps its window incrementally: each boundary must read the same
figures as recomputing every average over the window, on streams with idle spells, arrival
boundaries, steps of zero length and long prefills. The reference below is the
recomputation the tracker did before (O(window) Python at every step boundary)."""

from __future__ import annotations

import random
from collections import deque

import pytest

from policies import SignalTracker, StepSample
from policies.signals import MIN_SAMPLES, p95


class Recomputed:
    """The windowed figures, recomputed from the whole window at every sample."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: deque = deque()
        self.ttfts: deque = deque()
        self.last_time: float | None = None

    def add(self, s: StepSample) -> dict:
        dt = 0.0 if self.last_time is None else max(s.time - self.last_time, 0.0)
        self.last_time = s.time
        self.samples.append((s, dt))
        self.ttfts.extend((s.time, t) for t in s.ttfts)
        horizon = s.time - self.window_s
        while self.samples and self.samples[0][0].time < horizon and len(self.samples) > MIN_SAMPLES:
            self.samples.popleft()
        while self.ttfts and self.ttfts[0][0] < horizon:
            self.ttfts.popleft()
        samples = [x for x, _ in self.samples if x.stepped] or [s]
        n = len(samples)
        steps = [d for (x, d), (prev, _) in zip(list(self.samples)[1:], self.samples) if d > 0 and x.running > 0
                 and prev.running > 0 and x.stepped]
        return {"queue_len": sum(x.waiting for x in samples) / n,
                "running": sum(x.running for x in samples) / n,
                "p95_ttft_s": p95(t for _, t in self.ttfts),
                "p95_tpot_s": p95(steps),
                "step_time_s": sum(steps) / len(steps) if steps else 0.0,
                "preemptions": sum(x.preemptions for x in samples)}


def stream(seed: int, n: int):
    """Boundaries of a server that bursts, idles, prefills long prompts and takes arrival
    boundaries (no step since the last sample)."""
    rng = random.Random(seed)
    t, running, waiting = 100.0, 0, 0
    for _ in range(n):
        kind = rng.random()
        if kind < 0.03:
            t += rng.uniform(2.0, 9.0)  # an idle spell longer than the window
            running, waiting = 0, 0
        elif kind < 0.08:
            t += rng.uniform(0.5, 3.0)  # a long prompt's prefill
        elif kind < 0.10:
            pass  # a sample at the same time as the last one
        else:
            t += rng.choice([0.004, 0.012, 0.012, 0.03, rng.uniform(0.001, 0.2)])
        if rng.random() < 0.2:
            running = max(0, min(64, running + rng.randint(-3, 4)))
        if rng.random() < 0.2:
            waiting = max(0, waiting + rng.randint(-2, 3))
        stepped = rng.random() > 0.1
        yield StepSample(time=t, waiting=waiting, oldest_wait_s=0.0, running=running, used_blocks=running,
                         capacity_blocks=64, preemptions=rng.choice([0, 0, 0, 0, 1, 2]),
                         ttfts=tuple(rng.uniform(0.01, 3.0) for _ in range(rng.choice([0, 0, 0, 1, 2]))),
                         stepped=stepped, tokens=running)


@pytest.mark.parametrize("seed", range(6))
def test_the_window_reads_what_recomputing_it_reads(seed):
    window_s = [2.0, 0.5, 5.0][seed % 3]
    tracker, reference = SignalTracker(window_s), Recomputed(window_s)
    for s in stream(seed, 3000):
        got = tracker.add(s)
        want = reference.add(s)
        for name, value in want.items():
            assert getattr(got, name) == value, (name, s.time)


def test_a_boundary_reads_no_more_samples_however_full_the_window():
    """Steps of 1 ms over a 10 s window hold 10,000 boundaries: the tracker must not walk
    them at each boundary (the recomputation read every sample of the window, every time).
    Counted, not timed: reads of the samples' fields per boundary."""
    reads = [0]

    class Counted(StepSample):
        def __getattribute__(self, name):
            if name == "waiting":
                reads[0] += 1
            return object.__getattribute__(self, name)

    tracker = SignalTracker(10.0)
    for i in range(20_000):
        tracker.add(Counted(time=0.001 * i, waiting=1, oldest_wait_s=0.0, running=8, used_blocks=8,
                            capacity_blocks=64, tokens=8))
    before = reads[0]
    for i in range(20_000, 21_000):
        tracker.add(Counted(time=0.001 * i, waiting=1, oldest_wait_s=0.0, running=8, used_blocks=8,
                            capacity_blocks=64, tokens=8))
    assert (reads[0] - before) / 1000 <= 8  # a constant few (the recomputation: 10,000)
