"""How many tokens a step may carry while requests decode (`step_token_budget`), so that the
step each decoding request waits on stays within the TPOT bound.

Why: vLLM schedules a step's decodes first and fills the rest of its token budget
(`max_num_batched_tokens`: 2,048 for a CPU API server) with prompt chunks, first come first
served, and every request decoding in that step waits for all of it. On a CPU a step of 2,048
prompt tokens takes over a second. Measured on a Zen 4 EPYC (the code trace at 329 MB,
suite-v4-zen4n): static W8A8 and MorphServe at all-W8A8 gave short-output requests their first
token in 0.6-0.9 s, then 8-14 tokens at 0.3-0.7 s each, because long prompts (up to 900 tokens)
shared their steps; plain bf16, whose small KV cache admitted fewer prompts at once, kept
those requests' TPOT under 0.2 s. A smaller budget makes vLLM's chunked prefill cut the
prompts so that the decodes come round every step. The right size depends on how fast this
CPU computes at the level served, so it comes from the step-time model (a kernel profile
measured at start-up, refined by the steps served), not from a constant: the chunk size
Sarathi-Serve sets by hand, per machine.

The budget is the decodes plus the prompt tokens whose predicted cost fits beside their
decode step within the bound, and never fewer than `MIN_PROMPT_TOKENS` prompt tokens (a prompt
must advance; below about a block the linears lose their batch efficiency). None (vLLM's
own budget) where nothing runs (a step's prompts then delay nobody's tokens) or where the
model cannot predict the level. Plain Python, tested in milliseconds.
"""

from __future__ import annotations

MIN_PROMPT_TOKENS = 128  # one CPU KV block: the least prompt work a budgeted step carries


def step_token_budget(model, level: int, bound: float, running: int,
                      min_prompt_tokens: int = MIN_PROMPT_TOKENS) -> int | None:
    """Tokens the next step may schedule at `level` with `running` requests in the engine
    (None: no budget). `bound`: the step time aimed at (seconds)."""
    if model is None or running < 1 or not model.known(level):
        return None
    decode = model.predict(level, float(running))
    per_token = model.prefill_seconds(level, 1.0)
    if decode is None or per_token is None or per_token <= 0:
        return None
    spare = bound - decode
    prompt = int(spare / per_token) if spare > 0 else 0
    return running + max(min_prompt_tokens, prompt)
