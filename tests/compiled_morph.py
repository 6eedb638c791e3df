"""MorphServe on vLLM's compiled graph, in a fresh process: greedy outputs at each level asked.

    python tests/compiled_morph.py MODEL PACK OUT.json --levels 0,30,0 --max-tokens 24 [--dtype D]

A process of its own because vLLM caches its environment once an engine core starts
(`envs.enable_envs_cache`), so the compile settings a test gives (VLLM_CPU_CI_ENV: Dynamo's
trace-once without Inductor's code generation) must be set before that process's first engine.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from morphserve.vllm.offline_engine import engine_core_of, in_process_llm  # noqa: E402
from tests.engine_utils import PROMPTS, greedy_tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("pack")
    ap.add_argument("out")
    ap.add_argument("--levels", required=True)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    llm = in_process_llm(args.model, args.pack, morph={"compile": True}, enforce_eager=False, max_model_len=1100,
                         dtype=args.dtype)
    core = engine_core_of(llm)
    mode = int(llm.llm_engine.vllm_config.compilation_config.mode)
    runs = []
    for level in (int(x) for x in args.levels.split(",")):
        core.morphserve_set_level(level)
        state = core.morphserve_state()
        runs.append({"level": state["level"], "tiers": state["tier_counts"],
                     "tokens": greedy_tokens(llm, PROMPTS, args.max_tokens)})
    Path(args.out).write_text(json.dumps({"compilation_mode": mode, "runs": runs}))
    sys.stdout.flush()
    os._exit(0)  # as tests/plain_vllm.py: skip vLLM's CPU engine teardown


if __name__ == "__main__":
    main()
