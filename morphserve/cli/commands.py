"""The `morphserve` command line.

Every user mistake surfaces as one `error: ...` line and exit status 2; tracebacks are
kept for genuine bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from morphserve.errors import USER_ERRORS, MorphServeError


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    # Not from prepare.py: that imports torch, and every CLI call (`serve`, `pack check`,
    # `policy`) builds this parser.
    from morphserve.doctor.advice import SLOW_FRACTION  # plain Python, no torch
    from morphserve.offline.datafiles import wikitext

    DEFAULT_CALIB, DEFAULT_EVAL = wikitext("valid"), wikitext("test")

    p = sub.add_parser(
        "prepare",
        help="build the W4A16 twin, the layer-importance order and the quality curve",
        description=(
            "Offline preparation of a MorphServe pack: a calibrated W4A16 twin of every decoder "
            "layer (GPTQ through llm-compressor, or an existing checkpoint), the Layer Importance "
            "Score swap order, and WikiText-2 perplexity against the number of quantized layers. "
            "The pack is written atomically: a failed run leaves nothing in PACK_DIR."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="full-precision HF model folder (Llama family)")
    p.add_argument("--out", type=Path, required=True, metavar="PACK_DIR", help="where to write the pack")
    p.add_argument("--bits", type=int, default=4,
                   help="weight bits of the twin; the runtime serves symmetric 4-bit (W4A16) only")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size; default: the largest of 128, 64, 32 dividing every "
                        "linear input size (SmolLM2's 576 needs 64)")
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB, metavar="FILE",
                   help="plain-text calibration data for GPTQ and the importance scores")
    p.add_argument("--eval-text", type=Path, default=DEFAULT_EVAL, metavar="FILE",
                   help="plain-text evaluation data for the perplexity curves")
    p.add_argument("--quantized", type=Path, default=None, metavar="CKPT",
                   help="use this existing compressed-tensors pack-quantized W4A16 checkpoint of the same "
                        "model instead of running GPTQ (checked for architecture and shapes)")
    p.add_argument("--tiers", default="auto", metavar="LIST",
                   help="precision tiers to build, comma-separated: 'w4a16', 'w8a8' (a W8A8-only pack: bf16 -> "
                        "int8) or 'w8a8,w4a16' (both twins, each with its own importance order and quality curve, "
                        "and the tiered ladder). 'auto': the ladder `morphserve doctor` recommends here: every tier whose "
                        "kernel this CPU's vLLM build runs (w8a8 only on AVX2-only CPUs), less one whose linears "
                        f"measure slower than {SLOW_FRACTION}x bf16's at batch 32 (timed in seconds, cached); with "
                        "--quantized / --quantized-w8a8, the tiers of the checkpoints given. Each tier's kernel is "
                        "probed on this CPU first")
    p.add_argument("--compute-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the offline forwards (importance, perplexity), on the same bf16 weight values "
                        "either way. 'auto': fp32 where the CPU has no bf16 arithmetic (no AVX512_BF16 or AMX: torch "
                        "emulates bf16, about 10x slower); elsewhere whichever a quick matmul measures faster here, "
                        "bf16 on a near tie. GPTQ's calibration forwards (llm-compressor) run in fp32 where the CPU "
                        "has no bf16 arithmetic or fp32 is asked for; the checkpoint is stored as bf16 either way")
    p.add_argument("--w8a8-method", choices=("gptq", "rtn", "smoothquant-gptq"), default="gptq",
                   help="how llm-compressor picks the W8A8 int8 weights (SmoothQuant changes the RMSNorm "
                        "weights a layer shares with its bf16 self, so a smoothed twin cannot be swapped per layer)")
    p.add_argument("--w4a16-method", choices=("gptq", "rtn"), default="gptq",
                   help="how llm-compressor picks the W4A16 weights: GPTQ (calibrated; the default) or "
                        "round-to-nearest (seconds, no calibration forwards, a worse quality curve: for quick "
                        "packs, e.g. a tiered test pack on a CPU whose vLLM build has no W4A16 kernel)")
    p.add_argument("--w8a8-order", choices=("lis", "w4a16"), default="lis",
                   help="the W8A8 tier's swap order: its own greedy LIS search ('lis', as long again as the "
                        "W4A16 one) or the W4A16 tier's order ('w4a16': quick packs and tests)")
    p.add_argument("--quantized-w8a8", type=Path, default=None, metavar="CKPT",
                   help="use this existing compressed-tensors int-quantized W8A8 checkpoint instead of running "
                        "llm-compressor (checked for architecture, scheme and shapes)")
    p.add_argument("--eval-tokens", type=int, default=8184,
                   help="upper bound on tokens scored per perplexity point (cost grows linearly)")
    p.add_argument("--eval-window", type=int, default=1024, help="tokens per perplexity window")
    p.add_argument("--lis-tokens", type=int, default=1024,
                   help="calibration tokens for the importance scores (the greedy search runs ~L^2/2 partial forwards)")
    p.add_argument("--lis-window", type=int, default=256, help="tokens per importance calibration window")
    p.add_argument("--gptq-samples", type=int, default=32, help="GPTQ calibration sequences")
    p.add_argument("--gptq-seq-len", type=int, default=512, help="tokens per GPTQ calibration sequence")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="replace PACK_DIR if it already holds something")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from morphserve.offline.prepare import PrepareOptions, run_prepare
    from morphserve.offline.report import summarize_pack

    opt = PrepareOptions(
        model=args.model, out=args.out, bits=args.bits, group_size=args.group_size, calib=args.calib,
        eval_text=args.eval_text, quantized=args.quantized, eval_tokens=args.eval_tokens,
        eval_window=args.eval_window, lis_tokens=args.lis_tokens, lis_window=args.lis_window,
        gptq_samples=args.gptq_samples, gptq_seq_len=args.gptq_seq_len, force=args.force,
        threads=args.threads, tiers=args.tiers, w8a8_method=args.w8a8_method, w4a16_method=args.w4a16_method,
        w8a8_order=args.w8a8_order,
        quantized_w8a8=args.quantized_w8a8, compute_dtype=args.compute_dtype, probe=_probe,
        speed=_speed,
    )
    run_prepare(opt)
    print(summarize_pack(args.out))
    return 0


def _probe(tiers: list[str]) -> dict[str, str | None]:
    """Each tier's kernel run once on this CPU through vLLM's own kernel class."""
    from morphserve.vllm.kernels import probe_tiers

    return probe_tiers(tiers)


def _speed(info, tiers: list[str], group_size: int):
    """Each tier's linears timed through vLLM's kernels here (cached with the doctor's and
    `serve`'s readings: seconds the first time on a machine, instant after)."""
    from morphserve.doctor import facts

    return facts.speed(info, tiers, group_size)


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="inspect a pack: check it against a model and this CPU, or summarise it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    psub = p.add_subparsers(dest="pack_command", required=True, metavar="ACTION")
    c = psub.add_parser("check", help="check a pack (format, every tier's files) and probe each tier's kernel on "
                                      "this CPU; exit 0 if it can be served here, 2 otherwise",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("pack", type=Path, metavar="PACK_DIR", help="a pack written by `morphserve prepare`")
    c.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="check the pack against this model (architecture, shapes, weight hash); default: the "
                        "model folder the pack was prepared from")
    c.add_argument("--tiers", default=None, metavar="LIST", help="check only these tiers (comma-separated)")
    c.set_defaults(func=_cmd_pack_check)
    k = psub.add_parser("kv-cost", help="measure what a KV cache dtype (fp8) costs in perplexity at the ladder's "
                                        "quarters, in vLLM on this CPU, and keep it where `serve` and `evaluate` "
                                        "find it (the quality budget then charges it; about 2 minutes)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    k.add_argument("pack", type=Path, metavar="PACK_DIR", help="a pack written by `morphserve prepare`")
    k.add_argument("--kv-cache-dtype", default="fp8", choices=("fp8",), help="the KV cache dtype to measure")
    k.add_argument("--tiers", default=None, metavar="LIST",
                   help="the tiers the server will serve (comma-separated; default: every tier that runs here)")
    k.add_argument("--force", action="store_true", help="measure again even if this pack and CPU kind have it")
    k.set_defaults(func=_cmd_pack_kv_cost)
    s = psub.add_parser("show", help="print a pack's summary: importance order, quality curves, tiers")
    s.add_argument("pack", type=Path, metavar="PACK_DIR")
    s.set_defaults(func=lambda args: print(_summary(args.pack)) or 0)


def _summary(pack: Path) -> str:
    from morphserve.offline.report import summarize_pack

    return summarize_pack(pack)


def _cmd_pack_check(args: argparse.Namespace) -> int:
    from morphserve.offline import pack as packfmt
    from morphserve.runtime import config as runtime_config
    from quant_layers.cpu_kind import this_cpu

    manifest = packfmt.load_manifest(args.pack)
    requested = [t.strip() for t in args.tiers.split(",")] if args.tiers else None
    model = args.model or manifest.model_path
    if not Path(model).is_dir():
        raise MorphServeError(f"the pack's model {model} is not here; pass --model MODEL_DIR")
    cfg = runtime_config.parse({"pack": str(args.pack.resolve()), "tiers": requested})
    runtime_config.check_pack_matches(cfg, model)
    verdict = _probe(manifest.tier_names)
    print(f"pack {args.pack}: {manifest.architecture}, {manifest.num_layers} layers, tiers "
          f"{', '.join(manifest.tier_names)}; CPU: {this_cpu().describe()}")
    for tier in manifest.tier_names:
        print(f"  {tier}: {'runs here' if verdict[tier] is None else 'does not run here: ' + verdict[tier]}")
    served = runtime_config.serve_tiers(manifest, requested, lambda tiers: {t: verdict[t] for t in tiers})
    print(f"served here as the ladder: bf16 -> {' -> '.join(served)}")
    return 0


def _cmd_pack_kv_cost(args: argparse.Namespace) -> int:
    from morphserve.evaluation import kv_quality
    from morphserve.offline import kv_cost
    from morphserve.offline import pack as packfmt
    from morphserve.offline.ladder import Ladder
    from morphserve.runtime import config as runtime_config
    from morphserve.vllm.platform_facts import fp8_kv_problem

    pack = args.pack.resolve()
    manifest = packfmt.load_manifest(pack)
    if not (pack / packfmt.QUALITY).exists():
        raise MorphServeError(f"{pack} has no {packfmt.QUALITY}: its evaluation windows are what is scored")
    config = json.loads((Path(manifest.model_path) / "config.json").read_text())
    problem = fp8_kv_problem(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if problem:
        raise MorphServeError(f"--kv-cache-dtype {args.kv_cache_dtype}: vLLM's CPU attention cannot serve it on this "
                              f"machine ({problem})")
    requested = [t.strip() for t in args.tiers.split(",")] if args.tiers else None
    tiers = runtime_config.serve_tiers(manifest, requested, _probe)
    top = Ladder.from_manifest(manifest, tiers).top
    entry = None if args.force else kv_cost.load(pack, args.kv_cache_dtype, tiers, top)
    if entry is None:
        entry = kv_quality.measure(Path(manifest.model_path), pack, tiers, top, args.kv_cache_dtype)
    else:
        print(f"already measured ({kv_cost.store_path(pack)}); --force measures again")
    print(f"{args.kv_cache_dtype} KV cache on {'+'.join(tiers)} ({entry['tokens']} tokens, {entry['cpu']}):")
    for level, factor in entry["factor"].items():
        print(f"  level {level:>3}: {factor - 1:+.2%} perplexity")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="morphserve",
        description="MorphServe: workload-aware quantized layer swapping and KV-cache resizing for vLLM.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_pack(sub)
    from morphserve.cli.serve import add_parser as add_serve

    add_serve(sub)
    from morphserve.cli.policy import add_parser as add_policy

    add_policy(sub)
    from morphserve.replay.run import add_parser as add_replay

    add_replay(sub)
    from morphserve.evaluation.cli import add_parser as add_evaluate

    add_evaluate(sub)
    from morphserve.cli.doctor import add_parser as add_doctor

    add_doctor(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
