"""One compiled slot call of a W8A8 twin, timed in isolation: what MorphServe's Python adds to
each of a step's 120 linears around vLLM's two int8 ops, and what each of its parts costs.

In a compiled engine every swappable linear is one call of the opaque op
`morphserve::slot_linear`, which looks up the layer's current forward and calls it. A served
benchmark (scripts/bench_same_rung.py) cannot resolve a few microseconds a linear on a 2-vCPU
machine whose own decode speed moves 10-30% between runs, so this times the parts in one
process, interleaved, on one real twin (vLLM's kernel, processed as an engine processes it):
- `op -> twin.__call__`: the op calling the twin through its `(x, weight, bias)` signature
  (the twin's `__call__`, the kernel's `apply_weights`, then its bound call), as the slot
  did before it called the bound call directly;
- `op -> bound call`: what the slot calls now (`W8Compute.direct`);
- `bound call alone`: no op, no dispatcher: the floor MorphServe's Python sits on;
- the three buffers of a call allocated with `torch.empty` against Inductor's allocator.
Medians of `--rounds` interleaved rounds, microseconds a call.

    python scripts/bench_slot_call.py [--batch 8] [--rounds 7] [--calls 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = (960, 576)  # SmolLM2-135M's fused qkv: out, in


def _timer(fn, calls: int) -> float:
    for _ in range(200):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - t) / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="tokens in the call (a decode step's batch)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is printed")
    ap.add_argument("--calls", type=int, default=3000, help="calls timed per part and round")
    args = ap.parse_args(argv)

    import torch

    from morphserve.vllm import compiled_slots
    from morphserve.vllm.kernels import _empty_strided, make_int8_kernel
    from quant_layers.swappable import W8Compute

    n, k = SHAPE
    gen = torch.Generator().manual_seed(0)
    twin = W8Compute(make_int8_kernel(), torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen),
                     torch.rand(n, 1, generator=gen) * 0.01 + 0.001, [n])
    if not getattr(twin.kernel, "lean", False):
        raise SystemExit("this CPU's int8 path has no lean call (static or asymmetric activations)")

    slot = compiled_slots.new_slot(twin)  # as a routed layer's slot holds its twin
    op = torch.ops.morphserve.slot_linear.default
    x = torch.randn(args.batch, k, generator=gen).to(torch.bfloat16)
    via_call = lambda x, bias: twin(x, compiled_slots._NO_WEIGHT, bias)  # noqa: E731  the slot's old path
    direct = twin.direct
    m = args.batch

    def slot_with(call):
        def run():
            compiled_slots._CALLS[slot] = call
            op(x, None, slot, n)
        return run

    parts = {
        "op -> twin.__call__ (before)": slot_with(via_call),
        "op -> bound call (now)": slot_with(direct),
        "bound call alone": lambda: direct(x, None),
        "3 buffers, torch.empty": lambda: (torch.empty((m, k), dtype=torch.int8), torch.empty((m, 1), dtype=torch.float32),
                                           torch.empty((m, n), dtype=torch.bfloat16)),
        "3 buffers, Inductor's allocator": lambda: (_empty_strided((m, k), (k, 1), torch.int8),
                                                   _empty_strided((m, 1), (1, 1), torch.float32),
                                                   _empty_strided((m, n), (n, 1), torch.bfloat16)),
    }
    readings: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, fn in parts.items():
            readings[name].append(_timer(fn, args.calls))
    compiled_slots._CALLS[slot] = direct
    print(f"one {n}x{k} W8A8 linear at {m} tokens, us a call, median [range] of {args.rounds} interleaved rounds")
    for name, values in readings.items():
        print(f"  {name:34s} {statistics.median(values):7.2f} [{min(values):.2f}, {max(values):.2f}]")
    saved = statistics.median(readings["op -> twin.__call__ (before)"]) - statistics.median(readings["op -> bound call (now)"])
    print(f"  the bound call saves {saved:.2f} us a linear, {120 * saved / 1000:.2f} ms a step of 120 linears")
    return 0


if __name__ == "__main__":
    sys.exit(main())
