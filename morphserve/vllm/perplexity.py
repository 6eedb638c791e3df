"""Perplexity as vLLM itself computes it (prompt_logprobs), for tools that check the pack's
curves against the serving engine, or measure what the pack's curves cannot: the KV cache's
own cost.

The pack's curves come from `prepare`'s offline model, which never has a KV cache. An FP8
cache changes what attention reads, so its cost can only be measured in vLLM, and only
where a prompt is prefilled in chunks: a chunk after the first attends to the earlier
ones *through the cache*, as decoding does; one unchunked pass attends to its own bf16
keys and values and never reads the cache.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm import LLM


def perplexity_of(llm: LLM, windows: list[list[int]]) -> tuple[float, int]:
    """Perplexity of tokens 1..W-1 of every window under a running vLLM `LLM`, and their count."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, out in zip(windows, outs):
        for pos, entry in enumerate(out.prompt_logprobs):
            if pos == 0:
                continue  # no context for the first token
            nll -= entry[w[pos]].logprob
            count += 1
    return math.exp(nll / count), count


def perplexity_by_level(llm: LLM, windows: list[list[int]], levels: list[int]) -> dict[int, float]:
    """vLLM's perplexity of `windows` with MorphServe's engine at each of `levels` (moved there
    synchronously, between two generate calls)."""
    from morphserve.vllm.offline_engine import engine_core_of

    core = engine_core_of(llm)
    out = {}
    for level in levels:
        answer = core.morphserve_set_level(level)
        if not answer.get("ok"):
            raise RuntimeError(f"could not move to level {level}: {answer.get('error')}")
        out[level] = perplexity_of(llm, windows)[0]
    return out


def chunked_morph_llm(model: Path, pack: Path, tiers: list[str] | None, kv_cache_dtype: str,
                      window_tokens: int, chunk: int) -> LLM:
    """A MorphServe engine (the pack's ladder, `tiers` of it) whose prompts are prefilled
    `chunk` tokens a step, one at a time, with no prefix cache: every chunk after the first
    reads the earlier ones back from a `kv_cache_dtype` cache."""
    from morphserve.vllm.offline_engine import in_process_llm

    return in_process_llm(model, pack, morph={"tiers": tiers} if tiers else None, enforce_eager=True,
                          max_model_len=window_tokens + 8, kv_cache_dtype=kv_cache_dtype,
                          enable_chunked_prefill=True, max_num_batched_tokens=chunk, max_num_seqs=1,
                          enable_prefix_caching=False)
