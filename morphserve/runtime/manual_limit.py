"""How often POST /morphserve/level may change the level.

A manual transition runs synchronously at one step boundary, so its cost is engine time
during which no request decodes; a caller in a loop (a script, a forged browser request)
could keep the engine transitioning. Counting calls is not enough: a 0 <-> top round trip
costs far more than a one-layer step. So the window opens when a transition *ends*, and
lasts at least SHARE_INVERSE times what the transition took: whatever the caller does,
manual transitions hold the engine at most 1/SHARE_INVERSE of the time.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARE_INVERSE = 10  # manual transitions use at most 10% of the engine's time


@dataclass
class ManualRateLimit:
    interval_s: float  # manual_min_interval_s; 0 turns the limit off
    open_at: float = float("-inf")  # monotonic time from which the next change is allowed

    def wait_s(self, now: float) -> float:
        """Seconds until a change is allowed (<= 0: allowed now)."""
        return 0.0 if self.interval_s == 0 else self.open_at - now

    def charge(self, started: float, ended: float) -> None:
        """A manual transition ran from `started` to `ended` (monotonic seconds)."""
        if self.interval_s:
            self.open_at = ended + max(self.interval_s - (ended - started), SHARE_INVERSE * (ended - started))
