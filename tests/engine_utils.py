"""Helpers for tests that drive the real vLLM engine."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from morphserve.harness.servers import run_in_group, serving

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n",
]


# Plain vLLM's answers by job (see plain_job): a baseline asked for twice in a session (the
# same prompts under the same engine settings) is computed once.
_PLAIN_RESULTS: dict[str, dict] = {}


def greedy_tokens(llm, prompts: list, max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy output token ids (text, or a list of token ids), ignoring EOS."""
    from vllm import SamplingParams

    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def plain_job(prompts: list, max_tokens, windows=None, gaps=None, **engine) -> dict:
    """One baseline run. max_tokens: an int or one per prompt. engine: kv_bytes,
    max_model_len, max_num_seqs (to reproduce the schedule of the engine under test).
    gaps: token sequences to rate with `last_token_gaps`."""
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    settings = {"kv_cache_memory_bytes" if k == "kv_bytes" else k: v for k, v in engine.items()}
    return {"engine": settings, "prompts": prompts, "lengths": lengths, "windows": windows, "gaps": gaps}


def plain_vllm_many(model: Path, jobs: list[dict], tmp: Path) -> list[dict]:
    """Plain vLLM in one subprocess for every job not answered yet this session (each job is
    its own `generate` call, so its batch is exactly its prompts)."""
    keys = [json.dumps([str(model), job], sort_keys=True) for job in jobs]
    todo = [(key, job) for key, job in dict(zip(keys, jobs)).items() if key not in _PLAIN_RESULTS]
    if todo:
        tmp.mkdir(parents=True, exist_ok=True)
        out, jobs_file, log = tmp / "plain.json", tmp / "plain-jobs.json", tmp / "plain.log"
        jobs_file.write_text(json.dumps([job for _, job in todo]))
        cmd = [sys.executable, str(REPO / "tests" / "plain_vllm.py"), str(model), str(out), "--jobs-json", str(jobs_file)]
        # In-process engine core: every request is added before the first step, as in the
        # engines under test (batch composition changes bf16 rounding on CPU).
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        for attempt in range(2):
            out.unlink(missing_ok=True)
            returncode = run_in_group(cmd, log, env=env, timeout=600)
            if returncode == 0 and out.exists():
                break
            # Seen once in CI: the baseline engine aborted during start-up in C++ ("terminate
            # called without an active exception") while another engine lived in the parent.
            # The baseline is not what is under test, so it gets one more try.
        else:
            raise AssertionError(f"plain vLLM baseline failed twice:\n{log.read_text()[-3000:]}")
        for (key, _), result in zip(todo, json.loads(out.read_text())):
            _PLAIN_RESULTS[key] = result
    return [_PLAIN_RESULTS[key] for key in keys]


def plain_vllm(model: Path, prompts: list, max_tokens, tmp: Path, windows=None, gaps=None, **engine) -> dict:
    """Plain vLLM's answer to one job (plain_job's arguments), computed unless already known."""
    return plain_vllm_many(model, [plain_job(prompts, max_tokens, windows, gaps, **engine)], tmp)[0]


# How far below plain vLLM's best a diverging greedy token may be and still count as a tie
# that bf16 rounding flipped (logits of this model differ by up to a few hundredths of a nat
# between batch shapes; a token from a wrong KV block or weight is nats away).
NEAR_TIE_NATS = 0.25


def last_token_gaps(llm, sequences: list[list[int]]) -> list[float]:
    """For each sequence, (best logprob - logprob of its last token) at the last position."""
    from vllm import SamplingParams
    from vllm import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences],
                        SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0), use_tqdm=False)
    gaps = []
    for s, o in zip(sequences, outs):
        entry = o.prompt_logprobs[-1]
        gaps.append(max(lp.logprob for lp in entry.values()) - entry[s[-1]].logprob)
    return gaps


def assert_same_or_near_ties(model: Path, prompts: list[list[int]], ours: list[list[int]],
                             theirs: list[list[int]], tmp: Path, label: str = "", **engine) -> int:
    """Greedy outputs equal plain vLLM's token for token, except where a batch shape or a
    recomputed prefill changed bf16 rounding (AMX kernels tile by batch size) and flipped a
    near-tie: at the first differing token plain vLLM itself must rate our token within
    NEAR_TIE_NATS of its best. After that point the continuations legitimately differ.
    `engine`: settings of plain vLLM's rating engine beside max_model_len (its dtype).
    Returns how many requests diverged."""
    assert [len(o) for o in ours] == [len(t) for t in theirs], f"{label}: output lengths differ"
    diverged = [(i, next(k for k, (a, b) in enumerate(zip(o, t)) if a != b))
                for i, (o, t) in enumerate(zip(ours, theirs)) if o != t]
    if not diverged:
        return 0
    (tmp / "gaps").mkdir(exist_ok=True)
    gaps = plain_vllm(model, [prompts[i] for i, _ in diverged], 1, tmp / "gaps",
                      gaps=[prompts[i] + ours[i][:d + 1] for i, d in diverged], max_model_len=1024, **engine)["gaps"]
    far = [(i, d, round(g, 3)) for (i, d), g in zip(diverged, gaps) if g > NEAR_TIE_NATS]
    assert not far, f"{label}: (request, first differing token, nats below plain vLLM's best): {far}"
    return len(diverged)


def score_windows(llm, windows: list[list[int]]) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(windows, outs):
        for pos, entry in enumerate(o.prompt_logprobs[1:], start=1):
            nll -= entry[w[pos]].logprob
            count += 1
    return nll, count


def skip_unless_w8a8_runs_in(dtype: str) -> None:
    """Skip an fp32 engine test where vLLM's W8A8 kernel refuses that dtype: on AMX CPUs its
    sgl int8 path takes bf16 or fp16 activations only ("int8_scaled_mm_with_quant: expect A to
    be bfloat16 or half"), so `serve --dtype float32` refuses a W8A8 tier there in one line.
    fp32 engines are for CPUs that emulate bf16 (AVX2), where oneDNN's int8 path takes fp32."""
    import pytest
    import torch

    from morphserve.vllm.kernels import probe_tier

    reason = probe_tier("w8a8", getattr(torch, dtype))
    if reason is not None:
        pytest.skip(f"W8A8 in {dtype} does not run on this CPU: {reason}")


def morph_llm(model: Path, pack: Path, twin: str, **kw) -> tuple:
    """An in-process engine core (the scheduler and controller are reachable) with MorphServe on."""
    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm

    kw.setdefault("max_model_len", 1100)
    llm = in_process_llm(model, pack, twin=twin, **kw)
    return llm, engine_core_of(llm)


@contextlib.contextmanager
def running_server(args: list[str], env: dict, log: Path, port: int, timeout: float = 240,
                   host: str = "127.0.0.1") -> Iterator[str]:
    """`morphserve serve ARGS` in its own process group: yields the base URL once /health
    answers; kills the whole group (API server, engine core, workers) afterwards."""
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", *args, "--host", host, "--port", str(port)]
    with serving(cmd, env, log, port, timeout=timeout, cwd=REPO) as server:
        yield server.url
