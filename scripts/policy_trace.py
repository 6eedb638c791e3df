"""The demand policy's signals and decisions on seeded random boundary streams, one JSON line a
boundary: run it from two checkouts (`--tree`) and compare the files to show that a change to
policies/ made for speed changes no decision (`cmp a.jsonl b.jsonl`).

Each scenario is a 30-layer ladder (W8A8-only, or W8A8 then W4A16: even scenarios the one,
odd the other) with a kernel profile measured on a Zen 5 EPYC (`morphserve doctor`, seconds a
decoder layer's linears), `default` as a served engine runs it (scenarios 2-3 of every 4:
as a compiled engine runs it), and a stream of boundaries with bursts, idle spells longer
than the signal window, long prefills and arrival boundaries; the controller carries out
about half of the decisions. Plain Python, no engine; prints the seconds the decisions took.

    python scripts/policy_trace.py --out a.jsonl [--tree DIR] [--scenarios 8] [--boundaries 6000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

# seconds a decoder layer's linears at batch 1 / 8 / 32 / 256 (`morphserve doctor`, Zen 5 EPYC, bf16 engine)
PROFILE = {"bf16": {1: 0.0001864, 8: 0.0002196, 32: 0.0003816, 256: 0.0019892},
           "w8a8": {1: 0.000145, 8: 0.0001487, 32: 0.000252, 256: 0.0012217},
           "w4a16": {1: 0.0002646, 8: 0.00035, 32: 0.0007953, 256: 0.0049998}}
LAYERS = 30
# a quality curve with a knee: +3% at all-W8A8, W4A16 rungs dearer
QUALITY = {"orders": {"lis": {"ppl": {str(k): 20.0 * (1 + 0.03 * k / LAYERS + 0.01 * max(0, k - 15) / 15)
                                      for k in range(LAYERS + 1)}}}}


def scenario(index: int, boundaries: int, out) -> float:
    from policies import PolicyState, StepSample, load_policy, make_policy, make_tracker
    from policies.config import for_compiled_engine, log_ppl_ratios, resolve_budget

    rng = random.Random(index)
    tiered = index % 2 == 1
    mix = [({"w8a8": min(k, 15), "w4a16": max(0, k - 15)} if tiered else {"w8a8": k}) for k in range(LAYERS + 1)]
    caps = [19 + round(35 * k / LAYERS) + (round(30 * max(0, k - 15) / 15) if tiered else 0)
            for k in range(LAYERS + 1)]
    cfg, _ = load_policy("default")
    if index % 4 >= 2:
        cfg, _ = for_compiled_engine(cfg)
    ratios = log_ppl_ratios(QUALITY, LAYERS)
    cfg = resolve_budget(cfg, QUALITY, mix)
    policy = make_policy(cfg, caps, cfg.level_cap(LAYERS, QUALITY), ratios)
    profile = PROFILE if tiered else {t: v for t, v in PROFILE.items() if t != "w4a16"}
    tracker = make_tracker(cfg, LAYERS, ratios, mix, profile)
    state, spent = PolicyState(), 0.0
    t, running, waiting, level = 1000.0, 0, 0, 0
    for i in range(boundaries):
        r = rng.random()
        if r < 0.01:
            t += rng.uniform(3, 12)  # idle, longer than the signal window
            running = waiting = 0
        elif r < 0.04:
            t += rng.uniform(0.2, 1.5)  # a long prefill
        else:
            t += 0.004 + 0.0012 * running * (1 - 0.3 * level / LAYERS) + rng.uniform(0, 0.003)
        if rng.random() < 0.15:
            running = max(0, min(40, running + rng.randint(-2, 3)))
        if rng.random() < 0.12:
            waiting = max(0, min(30, waiting + rng.randint(-2, 3)))
        prefill = rng.choice([0, 0, 0, 0, 0, 128, 512]) if running else 0
        sample = StepSample(
            time=t, waiting=waiting, oldest_wait_s=rng.uniform(0, 2) if waiting else 0.0, running=running,
            used_blocks=min(caps[level], running * 3), capacity_blocks=caps[level], arrivals=rng.choice([0, 0, 0, 1]),
            preemptions=rng.choice([0] * 20 + [1]), ttfts=tuple(rng.uniform(0.05, 3) for _ in range(rng.choice([0] * 8 + [1]))),
            waiting_blocks=waiting * 4, remaining_tokens=rng.uniform(10, 200), running_need_blocks=running * 4,
            waiting_need_blocks=waiting * 5, waiting_needs=tuple([5] * min(waiting, 16)), tokens=running + prefill,
            served_tokens=running + prefill, level=level, prefill_tokens=prefill,
            pending_prompt_tokens=waiting * rng.choice([100, 300, 900]), pending_output_tokens=(running + waiting) * 120,
            prompt_tokens_per_request=rng.choice([0.0, 200.0, 400.0]),
            output_tokens_per_request=rng.choice([0.0, 130.0]), stepped=rng.random() > 0.05)
        signals = tracker.add(sample)
        t0 = time.perf_counter()
        decision = policy.decide(signals, replace(state, level=level))
        spent += time.perf_counter() - t0
        out.write(json.dumps({"scenario": index, "boundary": i, "target": decision.target, "reason": decision.reason,
                              "state": repr(decision.state), "signals": signals.as_dict()}) + "\n")
        if rng.random() < 0.5:  # the controller carries out about half of the decisions
            state = decision.state
            if decision.target != level:
                tracker.step_model.observe_move("up" if decision.target > level else "down",
                                                abs(decision.target - level), 0.3)
            level = decision.target
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON lines file to write")
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose policies/ is run")
    ap.add_argument("--scenarios", type=int, default=8, help="seeded scenarios (seeds 0..N-1)")
    ap.add_argument("--boundaries", type=int, default=6000, help="boundaries a scenario")
    args = ap.parse_args(argv)
    if not (args.tree / "policies").is_dir():
        print(f"error: {args.tree} has no policies/ folder", file=sys.stderr)
        return 2
    sys.path.insert(0, str(args.tree.resolve()))
    with open(args.out, "w") as out:
        spent = sum(scenario(i, args.boundaries, out) for i in range(args.scenarios))
    n = args.scenarios * args.boundaries
    print(f"{n} boundaries written to {args.out}; decisions {spent:.2f} s ({1e6 * spent / n:.0f} us each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
