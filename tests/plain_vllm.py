"""Plain vLLM (no MorphServe) in a fresh process: the baseline the engine tests compare with.

    python tests/plain_vllm.py MODEL OUT.json --jobs-json JOBS.json
JOBS.json is a list of {"engine": {...} (vLLM settings; "model" picks another checkpoint), "prompts": [...], "lengths": [...], "windows": [...]?,
"gaps": [...]?}; OUT.json gets one result per job, in order. Each job is its own `generate`
call (its own batch); jobs with equal engine settings share one engine, built in job order.
Run as a subprocess so the baseline engine never shares a process with the engine under
test; one process serves many jobs because importing vLLM costs ~12 s a process here.
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from morphserve.vllm.offline_engine import in_process_llm  # noqa: E402


def run_job(llm, job: dict) -> dict:
    from vllm import SamplingParams

    # A prompt is text or a list of token ids.
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in job["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in job["lengths"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outs]}
    if job.get("windows") is not None:
        from tests.engine_utils import score_windows

        result["nll"], result["tokens"] = score_windows(llm, job["windows"])
    if job.get("gaps") is not None:
        from tests.engine_utils import last_token_gaps

        result["gaps"] = last_token_gaps(llm, job["gaps"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--jobs-json", required=True, help="file holding the list of jobs (see the module docstring)")
    args = ap.parse_args()
    jobs = json.loads(Path(args.jobs_json).read_text())
    results: list = [None] * len(jobs)
    # An engine setting "model" serves that checkpoint instead of MODEL (static baselines).
    configs = list(dict.fromkeys(json.dumps(job["engine"], sort_keys=True) for job in jobs))
    for config in configs:
        engine = json.loads(config)
        model = engine.pop("model", args.model)
        tp = engine.get("tensor_parallel_size", 1)
        if tp > 1:  # the CPU lists MorphServe supplies to its own engine where vLLM's `auto` stops
            from morphserve.runtime import thread_binding

            thread_binding.supply(os.environ, tp)
        # No pack: no general plugin loads (plain vLLM); static W4 baselines run the 4-bit
        # kernel MorphServe serves (in_process_llm sets it).
        llm = in_process_llm(model, None, enforce_eager=engine.pop("enforce_eager", True),
                             max_model_len=engine.pop("max_model_len", 1100), **engine)
        for i, job in enumerate(jobs):
            if json.dumps(job["engine"], sort_keys=True) == config:
                results[i] = run_job(llm, job)
        del llm
        gc.collect()
    Path(args.out).write_text(json.dumps(results))
    sys.stdout.flush()
    # vLLM 0.32's CPU engine teardown sometimes aborts in C++ ("terminate called without an
    # active exception"); the result is already written, so skip it. The caller reaps the
    # engine's child processes (morphserve.harness.servers.run_in_group).
    os._exit(0)


if __name__ == "__main__":
    main()
