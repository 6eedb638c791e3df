"""A step-time model: how long one decode step takes at each level of the ladder, as a
function of how many requests are in the batch.

Why it exists: whether a quantized layer is cheaper or dearer than a bf16 one depends on
the CPU and on the batch (without AMX int8 beats bf16 at every batch; on an AVX2-only EPYC
it loses at batch 1 and wins at 32), so no constant can be right everywhere. The policy
asks it which rung is fast enough *before* it moves there.

Two sources:
- a **kernel profile** measured at start-up (seconds per decoder layer's linears, per tier
  and batch size, through vLLM's own kernels; morphserve.runtime.tier_speed). A decode step
  differs between levels only in its decoder layers' linears, so the profile gives every
  level's step as `base(batch) + sum over tiers of (layers in the tier) x (tier's time)`,
  where `base` (attention, norms, the LM head, the engine) is about linear in the batch;
- **online fits** of `base(batch)` (an exponentially weighted least-squares line of step
  time against running requests, with the profile's tier part taken out). With a profile
  there is one fit for every level: steps served at any level refine the one base the
  levels share, the profile says how they differ, and so every level is "known" as soon
  as the base is, and no two levels are compared on bases learned from different loads
  (two fits, one learned in a warm-up at batch 4 and one under a burst, made a 4-bit rung
  look faster than all-W8A8). Without a profile, a fit per level: a level is known only
  from its own steps, and one never served borrows the nearest lower level's fit for a
  prediction (the batch's cost is extrapolated, the quantized kernel's own is not assumed).

Prompts (with a profile only): a prefill step costs its decode part plus, per prompt
token, the level's linears at their marginal cost per token (the profile's slope between
its two largest batches, 256 and 1024 tokens: prompt sizes) plus a cost the levels share
(attention over the prompt, norms, the engine), learned from the prefill steps served at any level. Measured on a 2-core
AVX-512 Xeon, a 1,021-token prompt took 2.8 s in bf16 and 1.4 s in all-W8A8: both fit
about 1 ms per token outside the linears, against 1.44 ms for bf16's linears. So the
policy can tell, before a long prompt is scheduled, whether the level it is at can give it
its first token in time. Until the first prefill step is seen, the shared cost is taken
as equal to bf16's linears' (`PROMPT_PRIOR_OF_BF16`): the first long prompt comes before
any lesson, and the prior has the right size where it was measured; the first prefill step
replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_WEIGHT = 20.0  # effective samples a fit needs before it predicts on its own (a forced warm-up is a few)
# With a profile the fit is only the base (attention, the engine): a few steps pin it down.
MIN_WEIGHT_PROFILED = 5.0
PROMPT_HALF_LIFE_STEPS = 10.0  # prefill steps are few and long: a short memory
PROMPT_PRIOR_OF_BF16 = 1.0  # before any prefill step: shared cost per prompt token = this x bf16 linears'
# Before any decode step (with a profile): the base = this x level 0's linears at the batch.
# Measured on a 2-vCPU AVX2-only EPYC in fp32: a batch-1 step took 76 ms in vLLM against 62 ms
# for the profile's 30 layers of linears (0.23); at batch 32 the linears were the whole step.
BASE_PRIOR_OF_BF16 = 0.25
MOVE_HALF_LIFE = 4.0  # transitions are few: the last handful say what one costs now


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
        return my + slope * (x - mx)


def interpolate(points: dict[int, float], x: float) -> float:
    """Piecewise-linear in the batch through the measured points, extended linearly past
    both ends (a kernel's cost per extra token is about constant beyond the last point)."""
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    lo, hi = (xs[0], xs[1]) if x <= xs[0] else (xs[-2], xs[-1]) if x >= xs[-1] else next(
        (a, b) for a, b in zip(xs, xs[1:]) if a <= x <= b)
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


@dataclass
class StepTimeModel:
    """`mix[k]`: layers per tier at level k (bf16 layers need not be listed); without it, a
    ladder of `num_layers` W4A16 rungs. `profile`: seconds per decoder layer's linears,
    {tier: {batch: seconds}}, bf16 included."""
    num_layers: int
    mix: list[dict[str, int]] | None = None
    profile: dict[str, dict[int, float]] | None = None
    half_life_steps: float = 200.0
    _fits: dict[int, _Fit] = field(default_factory=dict)
    prompt_token_s: float | None = None  # learned: seconds per prompt token outside the linears
    prompt_learned: bool = False  # False: prompt_token_s is the profile's prior
    # learned from the transitions the engine waited for: seconds per layer swapped, by
    # direction ("up": quantize, "down": restore)
    move_layer_s: dict[str, float] = field(default_factory=dict)
    # A server holding prompt twins for the ladder's first N layers computes every prompt step
    # through them at any level below N, so a prompt costs there what it costs at level N: a
    # move up to a level at or below N buys a prompt nothing and slows the decodes.
    prompt_twin_layers: int = 0

    def __post_init__(self):
        if self.mix is None:
            self.mix = [{"w4a16": k} if k else {} for k in range(self.num_layers + 1)]
        if self.profile is not None and "bf16" not in self.profile:
            self.profile = None  # nothing to measure the tiers against
        # (tier, layers) at each level, bf16 included: the top level has every swappable
        # layer out of bf16, so it gives the number of layers
        layers = sum(self.mix[-1].values())
        self._counts = []
        for counts in self.mix:
            quantized = [(t, n) for t, n in counts.items() if t != "bf16" and n > 0]
            self._counts.append([("bf16", layers - sum(n for _, n in quantized)), *quantized])
        self._parts_at: dict[float, list[float]] = {}  # batch -> each level's tier_part
        self._slopes = self._level_slopes() if self.profile is not None else None
        if self._slopes is not None and self.prompt_token_s is None:
            self.prompt_token_s = PROMPT_PRIOR_OF_BF16 * self._slopes[0]

    def _level_slopes(self) -> list[float]:
        """Each level's linears' marginal seconds per token at large batches."""
        per_tier = {}
        for tier, points in self.profile.items():
            xs = sorted(points)
            per_tier[tier] = (max(0.0, (points[xs[-1]] - points[xs[-2]]) / (xs[-1] - xs[-2])) if len(xs) > 1
                              else points[xs[0]] / max(xs[0], 1))
        return [sum(n * per_tier.get(t, per_tier["bf16"]) for t, n in counts) for counts in self._counts]

    # -- the tier mix and the profile's part ---------------------------------------------
    def tier_part(self, level: int, running: float) -> float:
        """What the profile says the level's decoder-layer linears cost in one step.
        Memoized for every level at once per batch: a decision walks the whole ladder at
        one or two batch sizes (the run of faster rungs above the level served, at every
        step boundary while a server rests on it)."""
        if self.profile is None:
            return 0.0
        parts = self._parts_at.get(running)
        if parts is None:
            times = {t: interpolate(v, running) for t, v in self.profile.items()}  # each tier's s a layer
            # a tier the profile lacks is counted at bf16's speed (the online fit absorbs it)
            parts = [sum(n * times.get(t, times["bf16"]) for t, n in counts) for counts in self._counts]
            if len(self._parts_at) > 256:
                self._parts_at.clear()
            self._parts_at[running] = parts
        return parts[self._index(level)]

    # -- learning ----------------------------------------------------------------------
    def key(self, level: int) -> int:
        """Which fit a level's steps teach: the shared base with a profile, its own without."""
        return -1 if self.profile is not None else level

    def observe(self, level: int, running: int, seconds: float) -> None:
        if running <= 0 or seconds <= 0:
            return
        decay = math.exp(-math.log(2) / self.half_life_steps)
        base = seconds - self.tier_part(level, running)
        self._fits.setdefault(self.key(level), _Fit()).add(float(running), base, decay)

    def observe_prefill(self, level: int, running: int, prompt_tokens: int, seconds: float) -> None:
        """A step that computed `prompt_tokens` of prompts: what it took beyond its predicted
        decode part and the level's linears teaches the shared cost of a prompt token."""
        decode = self.predict(level, running) if self._slopes is not None else None
        if decode is None or prompt_tokens <= 0 or seconds <= 0:
            return
        per_token = max(0.0, (seconds - decode) / prompt_tokens - self._slopes[self._prompt_index(level)])
        if not self.prompt_learned:
            self.prompt_token_s, self.prompt_learned = per_token, True
        else:
            self.prompt_token_s += (1 - math.exp(-math.log(2) / PROMPT_HALF_LIFE_STEPS)) * (per_token - self.prompt_token_s)

    def observe_move(self, direction: str, layers: int, seconds: float) -> None:
        """A transition the engine waited for (`direction` "up" or "down"): what one costs
        decides whether moving for a prompt gives it its first token sooner at all (on a
        2-vCPU AVX2 EPYC in fp32, 13 layers took 0.45 s for a prefill 0.06 s faster)."""
        if layers <= 0 or seconds <= 0 or direction not in ("up", "down"):
            return
        per_layer, old = seconds / layers, self.move_layer_s.get(direction)
        alpha = 1 - math.exp(-math.log(2) / MOVE_HALF_LIFE)
        self.move_layer_s[direction] = per_layer if old is None else old + alpha * (per_layer - old)

    def move_seconds(self, level: int, to: int) -> float | None:
        """Seconds the engine would wait for a move from `level` to `to` (0 for none; None
        before any transition was timed; one direction stands in for the other)."""
        if to == level:
            return 0.0
        direction, other = ("up", "down") if to > level else ("down", "up")
        per_layer = self.move_layer_s.get(direction, self.move_layer_s.get(other))
        return None if per_layer is None else abs(to - level) * per_layer

    def prefill_seconds(self, level: int, prompt_tokens: float) -> float | None:
        """Seconds to compute `prompt_tokens` of prompts at `level`; None without a profile."""
        if self.prompt_token_s is None or self._slopes is None:
            return None
        return prompt_tokens * (self.prompt_token_s + self._slopes[self._prompt_index(level)])

    def _index(self, level: int) -> int:
        return max(0, min(level, len(self._counts) - 1))

    def _prompt_index(self, level: int) -> int:
        """The level whose linears compute a prompt step served at `level`."""
        return self._index(max(level, self.prompt_twin_layers))

    @property
    def min_weight(self) -> float:
        return MIN_WEIGHT_PROFILED if self.profile is not None else MIN_WEIGHT

    def _own(self, level: int) -> _Fit | None:
        fit = self._fits.get(self.key(level))
        return fit if fit is not None and fit.w >= self.min_weight else None

    def _usable(self, level: int) -> _Fit | None:
        """The fit that predicts `level`: its own; else, with a profile, the most learned
        one; else the nearest lower level's (batch cost only)."""
        own = self._own(level)
        if own is not None:
            return own
        ready = {c: f for c, f in self._fits.items() if f.w >= self.min_weight}
        if not ready:
            return None
        if self.profile is not None:
            return max(ready.values(), key=lambda f: f.w)
        lower = [c for c in ready if c < level]
        return ready[max(lower)] if lower else None

    def known(self, level: int) -> bool:
        """From steps served at this level (its tier, with a profile), or from the profile
        plus any served steps."""
        return self._own(level) is not None or (self.profile is not None and self._usable(level) is not None)

    def predict(self, level: int, running: float) -> float | None:
        """Seconds per decode step at `level` with `running` requests; None before any data.
        With a profile, a prediction before the first steps too, from a prior base
        (`BASE_PRIOR_OF_BF16`): a server's first burst can come before any step was served,
        and with nothing predicted the policy took the rung with the most KV, however slow
        its kernels (an fp32 server on an AVX2-only EPYC, fresh, took all-W8A8 for a burst
        of 16 prompts, where int8 decodes 2.6x slower). The first steps replace the prior."""
        fit = self._usable(level)
        running = max(running, 1.0)
        if fit is not None:
            base = fit.predict(running)
        elif self.profile is not None:
            base = BASE_PRIOR_OF_BF16 * self.tier_part(0, running)
        else:
            return None
        return max(1e-4, base + self.tier_part(level, running))

    def as_dict(self) -> dict:
        out = {("base" if c == -1 else f"level {c}"): {"weight": round(f.w, 1), "mean_running": round(f.sx / f.w, 2),
                                      "mean_base_s": round(f.sy / f.w, 4)}
               for c, f in sorted(self._fits.items()) if f.w}
        if self.prompt_token_s is not None:
            out["prompt_token_s"] = round(self.prompt_token_s, 6)
            out["prompt_token_s_from"] = "prefill steps" if self.prompt_learned else "prior (bf16 linears)"
        if self.move_layer_s:
            out["move_s_per_layer"] = {d: round(s, 5) for d, s in sorted(self.move_layer_s.items())}
        if self.profile is not None:
            out["profile"] = {t: {str(b): round(s, 6) for b, s in sorted(v.items())} for t, v in self.profile.items()}
        return out
