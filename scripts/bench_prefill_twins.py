"""What choosing the kernel per step would buy in a real engine: prompts through resident
W8A8 twins, decode steps in full precision.

Where vLLM's int8 kernel is slower than full precision at decode sizes and faster at prompt
sizes (`scripts/bench_linear_crossover.py`), every static precision, and every level of
MorphServe's ladder, loses one of the two. This measures the alternative in one in-process
engine serving the model in `--dtype`, with MorphServe's own layers and pack:

- `full`: level 0, every linear in full precision (what plain vLLM computes);
- `split-N`: the first N layers of the pack's quantization order also hold a W8A8 twin, built
  from the pack by the same code a swap uses, and each of their linears computes a call of
  at least `--min-tokens` tokens through the twin, a smaller one in full precision (so a
  prompt's step runs int8 there, a decode step does not);
- `w8a8`: the top of the W8A8 ladder (every layer int8), as a quantize leaves it, measured
  last (the configurations before it alternate over `--rounds`; this one needs a transition).

The twins are built once; a configuration only installs forwards. For each: the median seconds of a `--prompt-tokens` prompt with one output token (a prefill),
the decode tokens/s of one request (a 65-token generate minus a 1-token one, as
scripts/bench_kernels.py measures it), each a median [range] over the rounds; and for each
`split-N` the anonymous memory its twins took (read, heap trimmed, just before and after
they are built), beside what their kernels count. A mechanism
measurement on one engine, not a served row: the budget, the policy and the quality ledger
know nothing of twins held beside full precision. The process computes on one core with one
OpenMP thread, as a served worker does (an in-process engine would otherwise use every core).

    python scripts/bench_prefill_twins.py --model MODEL_DIR --pack PACK_DIR [--layers 0,15,30] [--repeats 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# A served worker computes on the one core vLLM binds it to; an in-process engine would use
# every core (2 threads here: a 320-token prompt in 0.57-0.80 s against about 1.2 s on one,
# with the other core's load deciding where in that range), and int8 and fp32 scale
# differently with threads. So this process computes on one core, with one OpenMP thread,
# set before torch loads its OpenMP runtime.
if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _prompt(n: int, salt: int) -> dict:
    return {"prompt_token_ids": [(17 * i + 5 + 31 * salt) % 5000 + 100 for i in range(n)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model directory")
    ap.add_argument("--pack", required=True, help="a MorphServe pack with a W8A8 tier")
    ap.add_argument("--dtype", default="float32", help="the engine's dtype (fp32 where bf16 is emulated)")
    ap.add_argument("--layers", default="8,15,30", help="comma-separated N: layers given a prompt twin, each a configuration")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternation over the configurations")
    ap.add_argument("--min-tokens", type=int, default=128, help="calls of at least this many tokens use the twin")
    ap.add_argument("--prompt-tokens", type=int, default=320, help="tokens in each timed prompt")
    ap.add_argument("--repeats", type=int, default=6, help="timed prompts per configuration and round (their median)")
    args = ap.parse_args(argv)

    from vllm import SamplingParams

    from morphserve.runtime.layer_set import trim_heap
    from quant_layers.swappable import SplitForward  # the server's own prompt-twin forward
    from morphserve.runtime.proc_memory import process_rss
    from morphserve.vllm.offline_engine import controller_of, engine_core_of, in_process_llm, layer_set_of

    llm = in_process_llm(args.model, args.pack, dtype=args.dtype, enforce_eager=True, max_model_len=1024,
                         max_num_seqs=8)
    core = engine_core_of(llm)
    layer_set = layer_set_of(core)
    controller = controller_of(core)
    order = controller.order  # the pack's quantization order: the first layers a move up quantizes
    one = SamplingParams(max_tokens=1, temperature=0.0)

    def prefill_s(salt: int) -> float:
        times = []
        for k in range(args.repeats):
            t0 = time.perf_counter()
            llm.generate(_prompt(args.prompt_tokens, salt + k), one, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def decode_tok_s(salt: int) -> float:
        rates = []
        for k in range(max(3, args.repeats // 2)):
            p = _prompt(32, salt + k)
            t0 = time.perf_counter()
            llm.generate(p, one, use_tqdm=False)
            t1 = time.perf_counter()
            llm.generate(p, SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True), use_tqdm=False)
            t2 = time.perf_counter()
            rates.append(64 / ((t2 - t1) - (t1 - t0)))
        return statistics.median(rates)

    sizes = sorted({int(x) for x in args.layers.split(",") if x.strip()})
    core.morphserve_set_level(0)
    forwards = {i: [s.kernels.forward_of(s.layer) for s in layer_set.layers[i]] for i in layer_set.layers}
    twins: dict[int, list] = {}
    held = {}
    trim_heap()
    before = process_rss()["rss_anon_bytes"]
    for n in sizes:  # built once, in order; each size's memory is all its twins' (cumulative)
        with layer_set._readers() as readers:
            for i in list(order)[:n]:
                if i not in twins:  # built and proved as a swap builds them
                    twins[i] = [s.prepare("w8a8", readers) for s in layer_set.layers[i]]
        trim_heap()
        held[n] = (process_rss()["rss_anon_bytes"] - before) / 2**20
    counted = {n: sum(t.nbytes for i in list(order)[:n] for t in twins[i]) / 2**20 for n in sizes}

    def install(n: int) -> None:
        for i in layer_set.layers:
            for s, full, twin in zip(layer_set.layers[i], forwards[i], twins.get(i, [None] * 4)):
                chosen = i in list(order)[:n]
                s.kernels.install(s.layer, SplitForward(full, twin, args.min_tokens) if chosen else full)

    configs = [0, *sizes]
    prefill = {n: [] for n in configs}
    decode = {n: [] for n in configs}
    llm.generate(_prompt(args.prompt_tokens, 0), one, use_tqdm=False)  # this length once, untimed
    for r in range(args.rounds):  # in alternation, so the machine's drift lands on all
        for n in configs:
            install(n)
            prefill[n].append(prefill_s(1000 * r + 10 * n))
            decode[n].append(decode_tok_s(1000 * r + 10 * n + 500))
            print(f"round {r + 1}, {n} layers with twins: prompt {prefill[n][-1]:.3f} s, "
                  f"decode {decode[n][-1]:.1f} tok/s", flush=True)
    install(0)
    for ts in twins.values():
        for t in ts:
            t.release()
    from policies.config import static_tier_level

    w8_level = static_tier_level([controller.ladder.counts(k) for k in range(controller.num_layers + 1)], "w8a8")
    core.morphserve_set_level(w8_level)  # a transition: every layer int8, for prompts and decodes alike
    llm.generate(_prompt(args.prompt_tokens, 1), one, use_tqdm=False)
    w8 = [prefill_s(9000 + 10 * r) for r in range(args.rounds)], [decode_tok_s(9500 + 10 * r) for r in range(args.rounds)]

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"

    base = statistics.median(prefill[0])
    print(f"\n| layers with a prompt twin (calls >= {args.min_tokens} tokens) | {args.prompt_tokens}-token prompt, s "
          f"| over full | decode tok/s, batch 1 | twins' anonymous memory, MiB (their kernels' count) |")
    print("|---|---|---|---|---|")
    for n in configs:
        mem = f"{held[n]:.0f} ({counted[n]:.0f})" if n else "0"
        print(f"| {n} | {spread(prefill[n], '.3f')} | {statistics.median(prefill[n]) / base:.3f}x "
              f"| {spread(decode[n], '.1f')} | {mem} |")
    print(f"| every layer W8A8 (level {w8_level}; after the others, not alternated) | {spread(w8[0], '.3f')} "
          f"| {statistics.median(w8[0]) / base:.3f}x | {spread(w8[1], '.1f')} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
