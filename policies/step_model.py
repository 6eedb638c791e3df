"""A step-time model learned online: how long one decode step takes at each level, as a
function of how many requests are in the batch (the tracker feeds it decode-only steps).

Why it exists: whether a quantized layer is cheaper or dearer than a bf16 one depends on
the CPU (with AMX, bf16 matmuls are fast and the 4-bit kernel is not; without it, int8
wins), so no constant can be right on both. The model learns it from the steps the engine
actually runs, and the policy asks it before it adds concurrency or quantized layers.

Per level bucket (level 0, and thirds of the swappable layers above it) it keeps an
exponentially weighted least-squares fit of step time = a + b * running requests. A
bucket with too little data borrows the nearest lower bucket's fit: the batch's cost is
extrapolated, the quantized kernel's own cost is not assumed (the policy may try a level
once, and then knows). With no spread of batch sizes yet, it predicts the mean (no slope
is guessed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_WEIGHT = 20.0  # effective samples a bucket needs before it predicts on its own (a forced warm-up is a few)


@dataclass
class _Fit:
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float, decay: float) -> None:
        self.w = self.w * decay + 1.0
        self.sx = self.sx * decay + x
        self.sy = self.sy * decay + y
        self.sxx = self.sxx * decay + x * x
        self.sxy = self.sxy * decay + x * y

    def predict(self, x: float) -> float:
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var < 1e-2:  # (nearly) one batch size seen so far: no slope to learn yet
            return my
        slope = max(0.0, (self.sxy / self.w - mx * my) / var)  # a bigger batch is never faster
        return max(1e-4, my + slope * (x - mx))


@dataclass
class StepTimeModel:
    num_layers: int
    half_life_steps: float = 200.0
    _fits: dict[int, _Fit] = field(default_factory=dict)

    def bucket(self, level: int) -> int:
        if level <= 0 or self.num_layers <= 0:
            return 0
        return min(3, 1 + (3 * (level - 1)) // max(self.num_layers, 1))

    def observe(self, level: int, running: int, seconds: float) -> None:
        if running <= 0 or seconds <= 0:
            return
        decay = math.exp(-math.log(2) / self.half_life_steps)
        self._fits.setdefault(self.bucket(level), _Fit()).add(float(running), seconds, decay)

    def known(self, level: int) -> bool:
        fit = self._fits.get(self.bucket(level))
        return fit is not None and fit.w >= MIN_WEIGHT

    def predict(self, level: int, running: float) -> float | None:
        """Seconds per step at `level` with `running` requests; None before any data."""
        for b in range(self.bucket(level), -1, -1):
            fit = self._fits.get(b)
            if fit is not None and fit.w >= MIN_WEIGHT:
                return fit.predict(max(running, 1.0))
        return None

    def as_dict(self) -> dict:
        return {str(b): {"weight": round(f.w, 1), "mean_running": round(f.sx / f.w, 2),
                         "mean_step_s": round(f.sy / f.w, 4)} for b, f in sorted(self._fits.items()) if f.w}
