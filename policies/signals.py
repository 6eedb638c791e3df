"""Load and memory-pressure signals, sampled at every step boundary and smoothed.

`StepSample` is one raw reading taken from the scheduler (see morphserve/vllm/scheduler.py);
`SignalTracker` turns the stream into `Signals` over a sliding time window. Plain Python:
the policies and their tests never touch vLLM.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field, fields

from policies.quality_budget import QualityLedger
from policies.step_model import StepTimeModel


MIN_SAMPLES = 4
# A step whose prompt part is smaller than this is mostly its decode part: too noisy to
# learn the cost of a prompt token from.
PREFILL_MIN_TOKENS = 64


@dataclass(frozen=True)
class StepSample:
    time: float  # seconds, monotonic
    waiting: int
    oldest_wait_s: float  # age of the oldest waiting request (queue delay)
    running: int
    used_blocks: int
    capacity_blocks: int
    arrivals: int = 0  # requests that arrived since the previous sample
    preemptions: int = 0  # since the previous sample
    ttfts: tuple[float, ...] = ()  # first tokens produced since the previous sample
    waiting_blocks: int = 0  # blocks the waiting requests' prompts need
    remaining_tokens: float = 0.0  # mean tokens still to generate per running request
    # blocks the running / waiting requests will hold when they finish (prompt + expected output)
    running_need_blocks: int = 0
    waiting_need_blocks: int = 0
    # the first waiting requests' needs at completion, in the order vLLM admits them
    waiting_needs: tuple[int, ...] = ()
    tokens: int = 0  # tokens computed (prefill and decode) since the previous sample
    # tokens as the evaluation counts them: a prompt's when its first token arrives, each
    # output token as it arrives (prefix-cache hits included, recomputation not)
    served_tokens: int = 0
    level: int = 0  # quantized layers in force at this sample (set by the controller)
    prefill_tokens: int = 0  # prompt tokens computed since the previous sample
    pending_prompt_tokens: int = 0  # prompt tokens not computed yet (waiting and partly prefilled requests)
    # output tokens still expected from the running and waiting requests (each request's
    # expected output, as in its need at completion, less what it has produced)
    pending_output_tokens: int = 0
    # the size of one request: mean prompt tokens of the requests in the system, and the
    # output one is expected to produce (the mean of finished ones); 0 where none is known
    prompt_tokens_per_request: float = 0.0
    output_tokens_per_request: float = 0.0
    # False for a boundary taken when requests arrived, before the next step is scheduled:
    # no step ran since the previous sample, so the gap between them is not a step's time
    stepped: bool = True


@dataclass(frozen=True)
class Signals:
    time: float = 0.0
    queue_len: float = 0.0
    queue_delay_s: float = 0.0
    kv_usage: float = 0.0
    running: float = 0.0
    used_blocks: int = 0
    capacity_blocks: int = 0
    waiting_blocks: int = 0
    arrival_rate: float = 0.0  # requests/s, EWMA
    p95_ttft_s: float = 0.0
    p95_tpot_s: float = 0.0  # p95 of step times with running requests (one token per step each)
    step_time_s: float = 0.0
    preemptions: int = 0
    blocks_per_request: float = 0.0
    remaining_tokens: float = 0.0
    need_blocks: int = 0  # running + waiting requests' blocks at completion
    waiting_need_blocks: int = 0
    running_need_blocks: int = 0  # the running requests' blocks at completion
    running_now: int = 0  # requests running at this boundary (`running` is the window's mean)
    waiting_needs: tuple[int, ...] = ()  # the first waiting requests' needs, in admission order
    need_per_request: float = 0.0  # blocks one request holds at completion (mean)
    token_rate: float = 0.0  # tokens/s computed, EWMA
    level: int = 0
    quality_increase: float = 0.0  # token-weighted perplexity increase over the quality window
    quality_tokens: float = 0.0  # tokens in that window
    pending_prompt_tokens: int = 0  # prompt tokens still to prefill now
    pending_output_tokens: int = 0  # output tokens the requests in the system are still expected to produce
    prompt_tokens_per_request: float = 0.0  # mean prompt of the requests in the system (0: none)
    output_tokens_per_request: float = 0.0  # output one request is expected to produce (0: not known)
    # learned state, shared by reference (not part of the logged record)
    step_model: StepTimeModel | None = field(default=None, compare=False, repr=False)
    ledger: QualityLedger | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("step_model", "ledger", "waiting_needs"):  # learned state; a list kept out of the log
                continue
            out[f.name] = round(v, 4) if isinstance(v, float) else v
        return out


def p95(values) -> float:
    return _p95_sorted(sorted(values))


def _p95_sorted(values: list) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


@dataclass
class SignalTracker:
    window_s: float = 2.0
    # optional learned state: a step-time model (needs the number of swappable layers) and
    # a quality ledger (needs each level's log-perplexity ratio from the pack's curve)
    step_model: StepTimeModel | None = None
    ledger: QualityLedger | None = None
    log_ratios: list[float] | None = None
    # A server holding prompt twins: steps of at least `twin_min_tokens` tokens are charged
    # `log_ratios` (level max(k, N)), smaller ones `plain_log_ratios` (level k).
    plain_log_ratios: list[float] | None = None
    twin_min_tokens: int | None = None
    # Tokens served (as the evaluation counts them) at each level in force, and of those the
    # ones in steps the prompt twins computed: a reader taking two readings apart charges
    # the tokens between them exactly (morphserve evaluate does).
    served_by_level: dict[int, int] = field(default_factory=dict)
    twin_served_by_level: dict[int, int] = field(default_factory=dict)
    # The window, kept so that a boundary costs the same however many steps the window holds
    # (a compiled engine on a Zen 5 steps every 12-15 ms: 130-170 boundaries in 2 s, more on a faster CPU, and
    # recomputing every average over them at each boundary was O(window) Python on the step's
    # critical path). Each figure is the same number the full recomputation gives: sums of
    # integers are exact, and the step times keep their order and a sorted copy.
    _samples: deque = field(default_factory=deque)  # (sample, dt, its step time counted in _steps)
    _ttfts: deque = field(default_factory=deque)  # (time, ttft)
    _steps: deque = field(default_factory=deque)  # step times, in window order
    _sorted_steps: list = field(default_factory=list)  # the same, sorted (their p95)
    _stepped: int = 0  # step boundaries in the window (arrival boundaries are not averaged)
    _waiting_sum: int = 0  # over those boundaries
    _running_sum: int = 0
    _preemptions_sum: int = 0
    _rate: float = 0.0
    _token_rate: float = 0.0
    _last_time: float | None = None
    _last_level: int | None = None

    def _enter(self, s: StepSample, dt: float) -> None:
        """`s` joins the window; its gap since the previous sample is a step's time only if
        the engine was busy through it (the first boundary after an idle spell measures the
        idle time too)."""
        prev = self._samples[-1][0] if self._samples else None
        step = prev is not None and dt > 0 and s.running > 0 and prev.running > 0 and s.stepped
        self._samples.append((s, dt, step))
        if step:
            self._steps.append(dt)
            bisect.insort(self._sorted_steps, dt)
        if s.stepped:
            self._stepped += 1
            self._waiting_sum += s.waiting
            self._running_sum += s.running
            self._preemptions_sum += s.preemptions

    def _leave(self) -> None:
        """The oldest sample leaves the window; the next one has no previous sample in the
        window any more, so its step time leaves with it."""
        s, _, _ = self._samples.popleft()
        if s.stepped:
            self._stepped -= 1
            self._waiting_sum -= s.waiting
            self._running_sum -= s.running
            self._preemptions_sum -= s.preemptions
        first, dt, step = self._samples[0]
        if step:
            self._steps.popleft()
            del self._sorted_steps[bisect.bisect_left(self._sorted_steps, dt)]
            self._samples[0] = (first, dt, False)

    def add(self, s: StepSample, charge: bool = True) -> Signals:
        """`charge`: the quality ledger counts this sample's tokens only while the policy is
        in charge (a forced level, such as a warm-up's, is the operator's choice)."""
        dt = 0.0 if self._last_time is None else max(s.time - self._last_time, 0.0)
        self._last_time = s.time
        if dt > 0:  # EWMAs of the arrival and token rates with time constant window_s
            alpha = 1.0 - math.exp(-dt / self.window_s)
            self._rate += alpha * (s.arrivals / dt - self._rate)
            self._token_rate += alpha * (s.tokens / dt - self._token_rate)
        # The step model learns decode steps only (each running request computed one token):
        # a step with a prefill chunk costs what that prompt costs at any level, and would
        # teach the model that more requests make steps slow when it is the prompts. A step
        # that spans a level change also timed the transition: it teaches nothing.
        decode_only = 0 < s.tokens <= s.running
        learn = self.step_model is not None and s.stepped and dt > 0 and s.level == self._last_level
        if learn and decode_only:
            self.step_model.observe(s.level, s.running, dt)
        elif learn and s.prefill_tokens >= PREFILL_MIN_TOKENS:
            self.step_model.observe_prefill(s.level, s.running, s.prefill_tokens, dt)
        self._last_level = s.level
        twin_step = self.twin_min_tokens is not None and s.tokens >= self.twin_min_tokens
        if s.served_tokens:
            self.served_by_level[s.level] = self.served_by_level.get(s.level, 0) + s.served_tokens
            if twin_step:
                self.twin_served_by_level[s.level] = self.twin_served_by_level.get(s.level, 0) + s.served_tokens
        if self.ledger is not None and self.log_ratios:
            ratios = self.log_ratios if twin_step or self.plain_log_ratios is None else self.plain_log_ratios
            self.ledger.add(s.time, s.served_tokens if charge else 0, ratios[min(s.level, len(ratios) - 1)])
        self._enter(s, dt)
        self._ttfts.extend((s.time, t) for t in s.ttfts)
        horizon = s.time - self.window_s
        # the window keeps at least MIN_SAMPLES boundaries: a prefill of a long prompt on a
        # small CPU can take longer than the whole window, and must still be seen as a step
        while self._samples[0][0].time < horizon and len(self._samples) > MIN_SAMPLES:
            self._leave()
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        # Averages over step boundaries only: an arrival boundary's waiting requests are the
        # ones the next step admits, not a queue (they would hold every restore's calm).
        if self._stepped:
            n, waiting, running, preemptions = (self._stepped, self._waiting_sum, self._running_sum,
                                                self._preemptions_sum)
        else:
            n, waiting, running, preemptions = 1, s.waiting, s.running, s.preemptions
        steps = self._steps
        return Signals(
            time=s.time,
            queue_len=waiting / n,
            queue_delay_s=s.oldest_wait_s,  # the current age, not an average: it only grows while stuck
            kv_usage=s.used_blocks / s.capacity_blocks if s.capacity_blocks else 0.0,
            running=running / n,
            used_blocks=s.used_blocks,
            capacity_blocks=s.capacity_blocks,
            waiting_blocks=s.waiting_blocks,
            arrival_rate=self._rate,
            p95_ttft_s=p95(t for _, t in self._ttfts),
            p95_tpot_s=_p95_sorted(self._sorted_steps),
            step_time_s=sum(steps) / len(steps) if steps else 0.0,
            preemptions=preemptions,
            blocks_per_request=s.used_blocks / s.running if s.running else 0.0,
            remaining_tokens=s.remaining_tokens,
            need_blocks=s.running_need_blocks + s.waiting_need_blocks,
            waiting_need_blocks=s.waiting_need_blocks,
            running_need_blocks=s.running_need_blocks,
            running_now=s.running,
            waiting_needs=s.waiting_needs,
            need_per_request=((s.running_need_blocks + s.waiting_need_blocks) / (s.running + s.waiting)
                              if s.running + s.waiting else 0.0),
            token_rate=self._token_rate,
            level=s.level,
            quality_increase=self.ledger.average_increase() if self.ledger is not None else 0.0,
            quality_tokens=self.ledger.tokens if self.ledger is not None else 0.0,
            pending_prompt_tokens=s.pending_prompt_tokens,
            pending_output_tokens=s.pending_output_tokens,
            prompt_tokens_per_request=s.prompt_tokens_per_request,
            output_tokens_per_request=s.output_tokens_per_request,
            step_model=self.step_model,
            ledger=self.ledger,
        )
