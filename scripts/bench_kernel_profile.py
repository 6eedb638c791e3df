"""Does the start-up kernel profile predict whole engines? Each tier's speed relative to
bf16, timed two ways through vLLM's kernels (one layer alone, which stays in the last-level
cache; and cycling through `layer_copies` layers, which streams the weights as a decode
step does), against whole engines decoding at the same batch sizes (the JSON that
scripts/bench_kernels.py writes on this machine).

    python scripts/bench_kernel_profile.py --model MODEL_DIR --engines bench-kernels.json [--repeats 3]

Prints, per tier and batch, the median relative speed [range] of each way and the whole
engines' figure, and each way's mean absolute error against the engines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from morphserve.doctor.advice import TIERS  # noqa: E402
from morphserve.runtime.tier_speed import BATCHES  # noqa: E402  (the batches the profile and bench_kernels use)
from morphserve.vllm.kernel_speed import fused_shapes, layer_copies, time_layer  # noqa: E402
from quant_layers.cpu_kind import last_level_cache_bytes, this_cpu  # noqa: E402
from quant_layers.model_info import default_group_size, read_model_info  # noqa: E402


def engine_ratios(path: Path) -> dict[str, dict[int, float]]:
    """tier -> batch -> decode speed relative to bf16, from bench_kernels' rows."""
    rows = json.loads(path.read_text())["rows"]
    speed = {r["weights"]: {int(b): v for b, v in r["decode_tok_s"].items()} for r in rows}
    bf16 = speed["bf16"]
    out = {}
    for name, by_batch in speed.items():
        tier = "w8a8" if name.startswith("W8A8") else "w4a16" if name.startswith("W4A16") else None
        if tier and tier not in out:
            out[tier] = {b: by_batch[b] / bf16[b] for b in BATCHES}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the bf16 HF model folder (its shapes are timed)")
    ap.add_argument("--engines", type=Path, required=True, help="scripts/bench_kernels.py --json output, this machine")
    ap.add_argument("--repeats", type=int, default=3, help="timings per way (default 3)")
    args = ap.parse_args(argv)
    info = read_model_info(args.model)
    shapes, group = fused_shapes(info.linear_shapes), default_group_size(info.input_sizes())
    llc = last_level_cache_bytes()
    ways = {"one layer": lambda t: 1, "streamed": lambda t: layer_copies(t, shapes, info.num_layers, llc)}
    engines = engine_ratios(args.engines)
    print(f"machine: {this_cpu().describe()}, last-level cache {llc / 2**20:.0f} MiB; "
          f"copies when streamed: {({t: ways['streamed'](t) for t in ('bf16', *TIERS)})}")
    ratios: dict[str, dict[str, dict[int, list[float]]]] = {w: {t: {b: [] for b in BATCHES} for t in TIERS} for w in ways}
    for rep in range(args.repeats):
        for way, copies in ways.items():
            secs = {t: time_layer(t, shapes, BATCHES, group, copies=copies(t)) for t in ("bf16", *TIERS)}
            for t in TIERS:
                for b in BATCHES:
                    ratios[way][t][b].append(secs["bf16"][b] / secs[t][b])
        print(f"repetition {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print("| tier | batch | whole engines | " + " | ".join(ways) + " |")
    print("|---|---|---|" + "---|" * len(ways))
    errors = {w: [] for w in ways}
    for t in TIERS:
        for b in BATCHES:
            cells = []
            for w in ways:
                runs = ratios[w][t][b]
                med = statistics.median(runs)
                errors[w].append(abs(med - engines[t][b]))
                cells.append(f"{med:.2f}x [{min(runs):.2f}, {max(runs):.2f}]")
            print(f"| {t} | {b} | {engines[t][b]:.2f}x | " + " | ".join(cells) + " |")
    for w in ways:
        print(f"{w}: mean absolute error against whole engines {statistics.mean(errors[w]):.3f} "
              f"(largest {max(errors[w]):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
