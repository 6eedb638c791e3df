"""The quality budget over time: the token-weighted perplexity increase the operator
accepts, averaged over a sliding window, rather than only a cap on layers.

Weights are log(ppl_k / ppl_0) per token, because the evaluation's figure is the
exponential of the token-weighted mean log-perplexity: a budget of B holds when the
window's mean weight stays <= log(1 + B). So a short burst may run deeply quantized as
long as the tokens served at full precision around it pay for it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class QualityLedger:
    window_s: float
    _entries: deque = field(default_factory=deque)  # (time, tokens, log-ppl ratio)
    _tokens: float = 0.0
    _cost: float = 0.0

    def add(self, time: float, tokens: float, log_ratio: float) -> None:
        if tokens > 0:
            self._entries.append((time, tokens, log_ratio))
            self._tokens += tokens
            self._cost += tokens * log_ratio
        while self._entries and self._entries[0][0] < time - self.window_s:
            _, n, r = self._entries.popleft()
            self._tokens -= n
            self._cost -= n * r

    @property
    def tokens(self) -> float:
        return max(self._tokens, 0.0)

    def average_increase(self) -> float:
        return math.exp(self._cost / self._tokens) - 1 if self._tokens > 0 else 0.0

    def token_rate(self, now: float) -> float:
        if not self._entries:
            return 0.0
        span = max(now - self._entries[0][0], 1.0)
        return self.tokens / span

    def allows(self, log_ratio: float, upcoming_tokens: float, budget: float) -> bool:
        """Would the window's average stay inside `budget` if the next `upcoming_tokens`
        were served with this log-ppl ratio? (Tokens leaving the window are ignored: that
        errs on the safe side while they were cheap ones.)"""
        upcoming = max(upcoming_tokens, 1.0)
        cost = self._cost + upcoming * log_ratio
        return cost / (self.tokens + upcoming) <= math.log1p(budget) + 1e-12
