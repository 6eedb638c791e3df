"""The precision tiers' kernel table: decode speed and perplexity of plain vLLM serving the
model statically in bf16, W8A8 int8 and W4A16, on this machine.

Each checkpoint runs in its own process (one vLLM engine per process), eager mode,
32-token prompts, 64 greedy tokens with `ignore_eos`, at batch 1, 8 and 32. Decode speed
is (batch x 63 tokens) / (time of a 64-token generate - time of a 1-token generate), so
the prefill and the first token are not counted; each cell is the best of `--repeats`.
Perplexity is vLLM's own (prompt_logprobs) on the pack's WikiText-2 windows.

    python scripts/bench_kernels.py PACK_DIR [--json OUT.json] [--repeats 2]

PACK_DIR must hold a W8A8 tier (`morphserve prepare --tiers w8a8,w4a16`); the bf16 model
is the one the pack was prepared from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCHES = (1, 8, 32)
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 64


def _cpu_flags() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "unknown")
    return {"cpu": model, "cores": os.cpu_count(), "amx": "amx_tile" in flags,
            "amx_int8": "amx_int8" in flags, "avx512_vnni": "avx512_vnni" in flags}


def measure_one(model: str, repeats: int, windows: list[list[int]]) -> dict:
    """Runs in a child process: one engine, every batch size, then perplexity."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from morphserve.vllm.kernels import W4A16_ENV

    os.environ.update(W4A16_ENV)  # the 4-bit kernel MorphServe serves (W4A16, not W4A8)
    from vllm import LLM, SamplingParams, TokensPrompt

    from morphserve.vllm.perplexity import perplexity_of

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=1100, seed=0,
              max_num_seqs=max(BATCHES))
    prompt = TokensPrompt(prompt_token_ids=[(17 * i + 5) % 5000 + 100 for i in range(PROMPT_TOKENS)])

    def timed(batch: int, tokens: int) -> float:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t = time.monotonic()
        llm.generate([prompt] * batch, params, use_tqdm=False)
        return time.monotonic() - t

    decode = decode_rates(timed, repeats)
    ppl, tokens = perplexity_of(llm, windows)
    return {"decode_tok_s": decode, "ppl": ppl, "ppl_tokens": tokens}


def decode_rates(timed: Callable[[int, int], float], repeats: int) -> dict[str, float]:
    """Decode tok/s per batch size: (batch x 63) / (a 64-token generate - a 1-token generate),
    so the prefill and the first token are not counted; the best of `repeats`. `timed(batch,
    tokens)` runs one generate and returns its seconds."""
    timed(1, 4)  # warm-up
    decode = {}
    for batch in BATCHES:
        best = 0.0
        for _ in range(repeats):
            full, first = timed(batch, OUTPUT_TOKENS), timed(batch, 1)
            best = max(best, batch * (OUTPUT_TOKENS - 1) / max(full - first, 1e-9))
        decode[str(batch)] = best
    return decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack", type=Path, help="a pack with a W8A8 tier (morphserve prepare --tiers w8a8,w4a16)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the best is kept (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=CKPT",
                    help="another checkpoint to measure the same way (e.g. a W8A8 made by another method)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: one checkpoint
    ap.add_argument("--windows", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:
        windows = json.loads(args.windows.read_text())
        print("RESULT " + json.dumps(measure_one(args.one, args.repeats, windows)), flush=True)
        # vLLM 0.32's CPU engine teardown sometimes aborts in C++ ("terminate called without
        # an active exception"); the result is printed, so skip the teardown.
        os._exit(0)

    from transformers import AutoTokenizer

    from morphserve.errors import MorphServeError
    from morphserve.harness.servers import run_in_group
    from morphserve.offline import pack as packfmt
    from quant_layers.eval_windows import load_windows

    try:
        manifest = packfmt.load_manifest(args.pack)
        tiers = packfmt.tier_dirs(args.pack, manifest)
    except MorphServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "w8a8" not in tiers:
        print(f"error: {args.pack} has no W8A8 tier; prepare it with --tiers w8a8,w4a16", file=sys.stderr)
        return 2
    quality = json.loads((args.pack / packfmt.QUALITY).read_text())
    tokenizer = AutoTokenizer.from_pretrained(manifest.model_path)
    windows = load_windows(Path(quality["eval_text"]), tokenizer, quality["window"], quality["tokens"])
    wfile = args.pack.parent / f".bench-kernels-windows-{os.getpid()}.json"
    wfile.write_text(json.dumps(windows.windows))
    runs = [("bf16", manifest.model_path), (f"W8A8 int8 ({manifest.tier('w8a8').quantization_source})",
                                            str(tiers["w8a8"])),
            (f"W4A16 g{manifest.group_size}", str(tiers["w4a16"]))]
    for item in args.also:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            print(f"error: --also {item!r}: give LABEL=CHECKPOINT_DIR", file=sys.stderr)
            return 2
        runs.append((label, path))
    rows = []
    try:
        for label, path in runs:
            print(f"[bench_kernels] {label}: {path}", file=sys.stderr, flush=True)
            # Its own process group, reaped after: vLLM's engine processes can outlive the child.
            log = wfile.with_suffix(".log")
            rc = run_in_group([sys.executable, __file__, str(args.pack), "--one", path, "--windows", str(wfile),
                               "--repeats", str(args.repeats)], log, env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
            text = log.read_text(errors="replace")
            log.unlink(missing_ok=True)
            line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(text[-3000:], file=sys.stderr)
                print(f"error: the {label} run failed (exit {rc})", file=sys.stderr)
                return 1
            kernel = next((k for k in ("CPUInt8ScaledMMLinearKernel", "CPUWNA16LinearKernel") if k in text), "bf16 (oneDNN/sgl)")
            rows.append({"weights": label, "kernel": kernel, **json.loads(line[len("RESULT "):])})
    finally:
        wfile.unlink(missing_ok=True)
    base = rows[0]
    machine = _cpu_flags()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, AMX: {'yes' if machine['amx'] else 'no'}, "
          f"AVX-512 VNNI: {'yes' if machine['avx512_vnni'] else 'no'}")
    print("| weights (all layers) | kernel | " + " | ".join(f"batch {b}" for b in BATCHES) + " | perplexity |")
    print("|---|---|" + "---|" * len(BATCHES) + "---|")
    for r in rows:
        cells = []
        for b in BATCHES:
            v = r["decode_tok_s"][str(b)]
            ratio = v / base["decode_tok_s"][str(b)]
            cells.append(f"{v:.1f}" + ("" if r is base else f" ({ratio:.2f}x)"))
        ppl = f"{r['ppl']:.2f}" + ("" if r is base else f" ({r['ppl'] / base['ppl'] - 1:+.1%})")
        print(f"| {r['weights']} | {r['kernel']} | " + " | ".join(cells) + f" | {ppl} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "batches": list(BATCHES), "prompt_tokens": PROMPT_TOKENS,
                                         "output_tokens": OUTPUT_TOKENS, "repeats": args.repeats, "rows": rows},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
