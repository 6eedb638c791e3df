"""What a system's FP8 KV cache costs in perplexity, charged in the evaluation's quality figure.

A run's quality is read off the pack's curve, which measures weights only (`prepare` has no
KV cache), so without this a system with `kv_cache_dtype: fp8` would be charged as if its
cache were bf16. The cost is measured in vLLM, on the serving engine itself: MorphServe's
engine on the pack, at a quarter-spaced set of levels of the ladder, scores the pack's
evaluation windows prefilled in chunks (so attention reads the cache) once with a bf16 and
once with an FP8 cache; the ratio at each measured level is the FP8 factor there, and the
levels between are interpolated (log-linearly). A run's charge is the token-weighted
geometric mean of the factor over the levels its tokens were computed at: with the curve's
own token weighting, perplexity x that charge is exactly the token-weighted perplexity of
the curve times the factors. Static systems sit at one level of the same ladder (bf16 at 0,
W8A8 halfway up a tiered ladder, W4A16 at its top), where MorphServe's engine computes what
plain vLLM computes with that checkpoint.

The measurement runs once per pack, ladder and CPU kind, kept in the cache folder
(morphserve.offline.kv_cost, where a serving engine finds it too), and recorded beside the
runs it charged in OUT/kv-quality.json.

    python -m morphserve.evaluation.kv_quality --child ...   (one engine; used by `evaluate`)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from morphserve.errors import MorphServeError
from morphserve.offline import kv_cost
from quant_layers.cpu_kind import this_cpu

MEASURED = "kv-quality.json"
WINDOWS = 4  # of the pack's evaluation windows (4 x 1,024 tokens with the default pack)
CHUNK = 128  # prefill tokens per step: vLLM's CPU KV block


def _charge(counts: dict[str, int], factors: dict[int, float]) -> float | None:
    total = sum(counts.values())
    if not total:
        return None
    return math.exp(sum(n * math.log(factors[int(k)]) for k, n in counts.items()) / total)


def charged(record: dict, factors: dict[int, float]) -> dict:
    """A run's quality fields with its KV cache's cost in them (idempotent: the weights-only
    figures are kept beside, and a second charge starts from them)."""
    ppl = record.get("ppl_weights_only", record.get("ppl"))
    increase = record.get("ppl_increase_weights_only", record.get("ppl_increase"))
    out_ppl = record.get("ppl_output_tokens_weights_only", record.get("ppl_output_tokens"))
    tokens = record["tokens_by_level"]
    both: dict[str, int] = {}
    for part in tokens.values():
        for k, n in part.items():
            both[k] = both.get(k, 0) + n
    both = record.get("server_tokens_by_level") or both  # by the level that computed them, where counted
    charge, charge_out = _charge(both, factors), _charge(tokens.get("output", {}), factors)
    return {"ppl_weights_only": ppl, "ppl_increase_weights_only": increase,
            "ppl_output_tokens_weights_only": out_ppl, "kv_ppl_factor": charge,
            "ppl": ppl * charge if ppl and charge else ppl,
            "ppl_increase": (1 + increase) * charge - 1 if increase is not None and charge else increase,
            "ppl_output_tokens": out_ppl * charge_out if out_ppl and charge_out else out_ppl}


def measured_factors(out: Path, model: Path, pack: Path, tiers: list[str], top: int,
                     kv_dtype: str = "fp8") -> dict[int, float]:
    """Every level's factor for the ladder of the served `tiers`: the cache folder's
    measurement for this pack and CPU kind, made now if there is none; recorded in
    OUT/kv-quality.json beside the runs it charged."""
    entry = kv_cost.load(pack, kv_dtype, tiers, top) or measure(model, pack, tiers, top, kv_dtype)
    path = out / MEASURED
    record = json.loads(path.read_text()) if path.exists() else {}
    record[f"{kv_dtype}:{','.join(tiers)}"] = entry
    path.write_text(json.dumps(record, indent=1) + "\n")
    return kv_cost.entry_factors(entry)


def measure(model: Path, pack: Path, tiers: list[str], top: int, kv_dtype: str = "fp8") -> dict:
    """Measure a `kv_dtype` cache's perplexity factor at the ladder's quarters (two engines,
    one after the other, each in a child process) and keep it in the cache folder."""
    from morphserve.harness.children import run_measurement

    levels = kv_cost.levels_to_measure(top)
    ppl = {}
    for dtype in ("auto", kv_dtype):
        print(f"[kv-cost] vLLM's perplexity with a {'bf16' if dtype == 'auto' else dtype} KV cache at levels "
              f"{levels} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "morphserve.evaluation.kv_quality", "--child", "--model", str(model),
               "--pack", str(pack), "--kv-cache-dtype", dtype, "--levels", ",".join(map(str, levels)),
               "--tiers", ",".join(tiers)]
        result = run_measurement(cmd)
        if result is None:
            raise MorphServeError(f"measuring the {dtype} KV cache's perplexity failed (its output is above)")
        ppl[dtype] = {int(k): v for k, v in result["ppl"].items()}
        tokens = result["tokens"]
    entry = {"top": top, "levels": levels, "windows": WINDOWS, "chunk": CHUNK, "tokens": tokens,
             "cpu": this_cpu().describe(), "ppl_bf16_kv": {str(k): ppl["auto"][k] for k in levels},
             f"ppl_{kv_dtype}_kv": {str(k): ppl[kv_dtype][k] for k in levels},
             "factor": {str(k): ppl[kv_dtype][k] / ppl["auto"][k] for k in levels}}
    kv_cost.save(pack, kv_dtype, tiers, entry)
    return entry


def _child(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from morphserve.harness.children import emit_result
    from morphserve.offline import pack as packfmt
    from morphserve.vllm.perplexity import chunked_morph_llm, perplexity_by_level
    from quant_layers.eval_windows import load_windows

    quality = json.loads((args.pack / packfmt.QUALITY).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    windows = load_windows(Path(quality["eval_text"]), tokenizer, quality["window"], quality["tokens"]).windows
    windows = windows[:WINDOWS]
    llm = chunked_morph_llm(args.model, args.pack, args.tiers.split(","),
                            args.kv_cache_dtype, max(len(w) for w in windows), CHUNK)
    levels = [int(x) for x in args.levels.split(",")]
    ppl = perplexity_by_level(llm, windows, levels)
    emit_result({"ppl": {str(k): v for k, v in ppl.items()}, "tokens": sum(len(w) - 1 for w in windows)})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", required=True, help="measure in this process (one engine)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--kv-cache-dtype", required=True)
    ap.add_argument("--levels", required=True, help="comma-separated ladder levels")
    ap.add_argument("--tiers", required=True, help="comma-separated pack tiers to serve")
    _child(ap.parse_args(argv))


if __name__ == "__main__":
    main()
