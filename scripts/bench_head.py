"""What the output head costs a decode step, and what an int8 head would save and cost.

MorphServe's rungs quantize decoder layers only: the head (`lm_head`, on SmolLM2 tied to the
input embedding) stays in the model dtype at every level, in static W8A8 checkpoints too
(llm-compressor's recipes leave it out). On a small model the head is a large share of a
decode step: SmolLM2-135M's is 49,152 x 576, a fifth of the weights' multiply-adds. This
measures, on the serving engine, what moving it to vLLM's own int8 kernel (per-channel
symmetric weights rounded to nearest, per-token dynamic activations: the W8A8 scheme of the
pack's twins) would change, before any rung is built on it:

- decode tok/s at batch 1, 8 and 32 of the static W8A8 checkpoint with its head as vLLM
  serves it and with an int8 head (one engine, both heads swapped in turn, order alternated
  by round, best of `--repeats` per cell as scripts/bench_kernels.py measures);
- the perplexity of the pack's evaluation windows (vLLM's prompt_logprobs, the tokens
  `prepare` scores) with each head, on the same engine;
- the bytes each head holds, and that the tied head's packed copy is a second copy of the
  embedding.

    python scripts/bench_head.py --model MODEL_DIR --pack PACK_DIR [--rounds 3]

PACK_DIR must hold a W8A8 tier (its static checkpoint is what is served). A development
measurement: no server uses an int8 head.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.children import emit_result, run_measurement  # noqa: E402
from scripts.bench_kernels import BATCHES, decode_rates  # noqa: E402  (the same cells, measured the same way)
from scripts.bench_same_rung import generate_timer  # noqa: E402


def int8_head(weight):
    """vLLM's int8 kernel over the head's weight, quantized as the pack's W8A8 twins are."""
    import torch

    from morphserve.vllm.kernels import make_int8_kernel
    from quant_layers.swappable import W8Compute

    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.clamp((weight.float() / scale).round(), -128, 127).to(torch.int8)
    return W8Compute(make_int8_kernel(), q, scale.to(torch.float32), [weight.shape[0]])


def child(model: str, pack: str, repeats: int, first: str) -> dict:
    import torch
    from transformers import AutoTokenizer

    from morphserve.evaluation.systems import static_w8a8_dir
    from morphserve.offline import pack as packfmt
    from morphserve.vllm.kernels import VllmCpuKernels
    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm, model_of
    from morphserve.vllm.perplexity import perplexity_of
    from quant_layers.eval_windows import load_windows

    llm = in_process_llm(static_w8a8_dir(Path(pack)), None, tokenizer=model, enforce_eager=True,
                         max_model_len=2048, max_num_seqs=max(BATCHES))
    net = model_of(engine_core_of(llm))
    head, embed = net.lm_head, net.model.embed_tokens
    kernels = VllmCpuKernels()  # the boundary's own way to read and install a linear's forward
    served = kernels.forward_of(head)
    int8 = int8_head(head.weight.data)
    heads = {"served": served, "int8": lambda x, _w, bias: int8(x, None, bias)}

    timed = generate_timer(llm)
    quality = json.loads((Path(pack) / packfmt.QUALITY).read_text())  # the tokens `prepare` scored
    windows = load_windows(Path(quality["eval_text"]), AutoTokenizer.from_pretrained(model), quality["window"],
                           quality["tokens"]).windows
    out = {"tied": head.weight is embed.weight, "shape": list(head.weight.shape),
           "head_bytes": {"served_packed_copy": head.weight.numel() * head.weight.element_size(),
                          "int8": int8.nbytes}}
    order = ["served", "int8"] if first == "served" else ["int8", "served"]
    for name in order:
        kernels.install(head, heads[name])
        with torch.inference_mode():
            out[name] = {"decode_tok_s": decode_rates(timed, repeats), "ppl": perplexity_of(llm, windows)[0]}
    kernels.install(head, served)
    return out


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the full-precision model folder the pack was prepared from")
    ap.add_argument("--pack", required=True, help="a pack with a W8A8 tier (its static checkpoint is served)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each a fresh engine (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="timings per cell within a round; the best is kept")
    ap.add_argument("--out", type=Path, default=None, help="also write every round's figures here as JSON")
    ap.add_argument("--child", choices=("served", "int8"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        emit_result(child(args.model, args.pack, args.repeats, args.child))
    from tqdm import tqdm

    runs = []
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        first = "served" if r % 2 == 0 else "int8"  # the head measured first alternates
        result = run_measurement([sys.executable, __file__, "--child", first, "--model", args.model,
                                  "--pack", args.pack, "--repeats", str(args.repeats)])
        if result is None:
            print(f"error: round {r + 1}'s engine failed (its output is above)", file=sys.stderr)
            return 1
        runs.append(result)
    one = runs[0]
    print(f"head {one['shape']}, tied to the embedding: {one['tied']}; bytes: served packed copy "
          f"{one['head_bytes']['served_packed_copy'] / 2**20:.1f} MiB, int8 {one['head_bytes']['int8'] / 2**20:.1f} MiB")
    print(f"medians [range] over {args.rounds} rounds (a fresh static W8A8 engine each, both heads in it)")
    print("| cell | head as served | int8 head | int8 / served |")
    print("|---|---|---|---|")
    for b in BATCHES:
        s = [x["served"]["decode_tok_s"][str(b)] for x in runs]
        i = [x["int8"]["decode_tok_s"][str(b)] for x in runs]
        print(f"| decode tok/s, batch {b} | {_summary(s)} | {_summary(i)} | {statistics.median(i) / statistics.median(s):.3f} |")
    s, i = [x["served"]["ppl"] for x in runs], [x["int8"]["ppl"] for x in runs]
    print(f"| perplexity (the pack's windows) | {_summary(s)} | {_summary(i)} | "
          f"{statistics.median(i) / statistics.median(s) - 1:+.2%} |")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
