"""Token windows for perplexity, shared by our own evaluator and the vLLM one.

Both sides must score exactly the same tokens for their perplexities to be comparable:
each window is scored on its tokens 1..W-1 (token 0 has no context), so `n` windows of
`W` tokens score n * (W - 1) tokens. So 16 windows of 1,024 tokens score 16,368.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from quant_layers.errors import QuantLayersError


@dataclass(frozen=True)
class Windows:
    windows: list[list[int]]

    @property
    def scored_tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def plan_windows(num_ids: int, window: int, max_scored_tokens: int) -> list[tuple[int, int]]:
    """Contiguous, non-overlapping [start, end) spans from the start of the text.

    The count is bounded by `max_scored_tokens` (the `--eval-tokens` knob) and by the text.
    """
    if window < 2:
        raise QuantLayersError(f"eval window must be at least 2 tokens, got {window}")
    n = min(num_ids // window, math.ceil(max_scored_tokens / (window - 1)))
    if n < 1:
        raise QuantLayersError(
            f"evaluation text has {num_ids} tokens, fewer than one {window}-token window"
        )
    return [(i * window, (i + 1) * window) for i in range(n)]


def load_windows(text_path: Path, tokenizer, window: int, max_scored_tokens: int) -> Windows:
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except OSError as e:
        raise QuantLayersError(f"cannot read evaluation text {text_path}: {e.strerror}") from None
    ids: Sequence[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    spans = plan_windows(len(ids), window, max_scored_tokens)
    return Windows([list(ids[a:b]) for a, b in spans])


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens)
