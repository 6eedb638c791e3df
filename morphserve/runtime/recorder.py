"""What the controller did, kept for people: the transition log (JSONL), the recent
transitions, counters and the duration histogram behind /morphserve/state and /metrics,
and the policy's decision time. Plain Python: it never calls the engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("morphserve")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TransitionHistogram:
    """Cumulative-bucket histogram of transition durations (engine side, plain Python)."""

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def as_dict(self) -> dict:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"buckets": [[str(le), n] for le, n in zip([*map(str, BUCKETS), "+Inf"], cumulative)],
                "sum": self.sum, "count": total}


def _spread_us(seconds) -> dict | None:
    """p50, p99 and max of recent durations, in microseconds (None: none yet)."""
    times = sorted(seconds)
    if not times:
        return None
    return {"p50": times[len(times) // 2] * 1e6, "p99": times[int(0.99 * (len(times) - 1))] * 1e6,
            "max": times[-1] * 1e6}


class Recorder:
    def __init__(self, log_path: str | None, stamp: dict | None = None):
        """`stamp`: fields every logged record carries (a server holding prompt twins
        stamps their count, so a reader of the log charges its tokens as the server did)."""
        self.log_path = Path(log_path) if log_path else None
        self.stamp = dict(stamp or {})
        # (monotonic, wall) time and level of every change of the level in force, not yet
        # written to the transition log: each logged record carries the changes it made, so
        # an evaluation can tell the precision every token was computed at.
        self.level_changes: list[list] = []
        self.recent: deque[dict] = deque(maxlen=50)
        self.transitions = 0
        self.by_direction = {"quantize": 0, "restore": 0}
        self.histogram = TransitionHistogram()
        self.decision_seconds: deque[float] = deque(maxlen=2000)
        self.step_seconds: deque[float] = deque(maxlen=2000)  # boundary to boundary, while serving
        # The controller's own time at every step boundary and arrival boundary: vLLM's
        # engine core runs it between two steps, so the worker waits for all of it.
        self.boundary_seconds: deque[float] = deque(maxlen=2000)
        self.boundary_total_s = 0.0
        self.boundary_count = 0
        # The policy's recent decisions, holds included, each kept when its reason's kind
        # changes: the transition log says what moved, this says why nothing did.
        self.decisions: deque[dict] = deque(maxlen=32)

    def level_changed(self, level: int) -> None:
        self.level_changes.append([time.monotonic(), time.time(), level])

    def finish(self, record: dict, direction: str) -> None:
        """A transition that completed: count it, keep it, log it."""
        self.transitions += 1
        self.by_direction[direction] += 1
        self.histogram.observe(record["seconds"])
        self.recent.append(record)
        self.write(record)

    def write(self, record: dict) -> None:
        record.update(self.stamp)
        record["levels"], self.level_changes = self.level_changes, []
        if self.log_path:
            try:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk must not fail a transition that already happened
                log.warning("MorphServe: could not append to the transition log %s: %s", self.log_path, e)

    def note_decision(self, when: float, level: int, decision, stepped: bool) -> None:
        kind = decision.reason.split(":")[0]
        last = self.decisions[-1] if self.decisions else None
        if last is not None and last["kind"] == kind and last["target"] == decision.target and last["level"] == level:
            # the latest reason too: a hold's reason changes while its kind does not (the
            # first of 3,214 holds at level 0 named the demand of the first arrival, 3 blocks,
            # and nothing said why a queue of 40 did not move it)
            last["repeats"] += 1
            last["last_reason"], last["last_time"] = decision.reason, round(when, 3)
            return
        self.decisions.append({"time": round(when, 3), "wall": round(time.time(), 3), "level": level,
                               "target": decision.target, "kind": kind, "reason": decision.reason,
                               "at": "step" if stepped else "arrival", "repeats": 0})

    def decision_us(self) -> dict | None:
        spread = _spread_us(self.decision_seconds)
        if spread is None:
            return None
        steps = sorted(self.step_seconds)
        return {"n": len(self.decision_seconds), **spread,
                "step_p50_us": steps[len(steps) // 2] * 1e6 if steps else None}

    def boundary_done(self, seconds: float) -> None:
        self.boundary_seconds.append(seconds)
        self.boundary_total_s += seconds
        self.boundary_count += 1

    def boundary_us(self) -> dict | None:
        """The controller's time between steps: the count and total since start (what a
        replay's worker waited for it) and the recent distribution."""
        spread = _spread_us(self.boundary_seconds)
        if spread is None:
            return None
        return {"n": self.boundary_count, "total_s": round(self.boundary_total_s, 4), **spread}

    def as_dict(self) -> dict:
        return {"transitions": self.transitions, "transitions_by_direction": dict(self.by_direction),
                "transition_seconds": self.histogram.as_dict(), "recent_transitions": list(self.recent)[-10:]}
