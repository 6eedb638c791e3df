"""Plain vLLM (no MorphServe) in a fresh process: the baseline the engine tests compare with.

    python tests/plain_vllm.py MODEL OUT.json --prompts-json '[...]' --max-tokens N [--ppl-text FILE]
Run as a subprocess so the baseline engine never shares a process with the engine under test.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from morphserve.vllm.offline_engine import in_process_llm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--prompts-json", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--max-tokens-json", default=None, help="per-prompt max_tokens (overrides --max-tokens)")
    ap.add_argument("--kv-bytes", type=int, default=None, help="KV cache size (same schedule as the engine under test)")
    ap.add_argument("--max-model-len", type=int, default=1100)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--windows-json", default=None, help="token windows to score with prompt_logprobs")
    ap.add_argument("--gaps-json", default=None,
                    help="token sequences; report how far each one's last token is below vLLM's best (nats)")
    args = ap.parse_args()
    extra = {"kv_cache_memory_bytes": args.kv_bytes} if args.kv_bytes else {}
    if args.max_num_seqs:
        extra["max_num_seqs"] = args.max_num_seqs
    # No pack: no general plugin loads (plain vLLM); static W4 baselines run the 4-bit
    # kernel MorphServe serves (in_process_llm sets it).
    llm = in_process_llm(args.model, None, enforce_eager=True, max_model_len=args.max_model_len, **extra)
    from vllm import SamplingParams
    # A prompt is text or a list of token ids.
    prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in json.loads(args.prompts_json)]
    lengths = json.loads(args.max_tokens_json) if args.max_tokens_json else [args.max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"token_ids": [list(o.outputs[0].token_ids) for o in outs]}
    if args.windows_json:
        from tests.engine_utils import score_windows

        result["nll"], result["tokens"] = score_windows(llm, json.loads(Path(args.windows_json).read_text()))
    if args.gaps_json:
        from tests.engine_utils import last_token_gaps

        result["gaps"] = last_token_gaps(llm, json.loads(Path(args.gaps_json).read_text()))
    Path(args.out).write_text(json.dumps(result))
    sys.stdout.flush()
    # vLLM 0.32's CPU engine teardown sometimes aborts in C++ ("terminate called without an
    # active exception"); the result is already written, so skip it. The caller reaps the
    # engine's child processes (morphserve.harness.servers.run_in_group).
    os._exit(0)


if __name__ == "__main__":
    main()
