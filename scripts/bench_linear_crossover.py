"""At how many tokens a step's linears run faster in W8A8 than in full precision, here.

On a CPU without native int8 matmul throughput to spare (an AVX2-only AMD EPYC serving fp32),
vLLM's int8 kernel loses badly at decode sizes and wins at prompt sizes: each call quantizes
its activations per token and then runs a faster GEMM, so the fixed cost dominates a decode
step and the GEMM dominates a prompt. Where that holds, neither static precision is best for
every step: which kernel a step wants depends on its token count. This times one decoder
layer's four fused linears (qkv, o, gate_up, down, SmolLM2-135M's shapes by default) through
the same vLLM kernel objects a swap installs and the start-up kernel profile times
(`morphserve.vllm.kernel_speed.time_layer`, weights streamed from memory as in a served
step), at each of `--tokens`, and prints both tiers' milliseconds per layer and their ratio.

    python scripts/bench_linear_crossover.py [--dtype float32] [--tokens 1,8,32,64,128,192,256,320,512]

One process, the engine's thread count (`--threads`, default 1: vLLM binds a CPU worker to
its cores and one core computes here). A kernel figure, not a served one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# SmolLM2-135M's linears, as the HF names give them: (out_features, in_features)
SMOLLM2_SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                  "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                  "mlp.down_proj": (576, 1536)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the full-precision tier's dtype (the engine's; fp32 where bf16 is emulated)")
    ap.add_argument("--tokens", default="1,8,32,64,128,192,256,320,512", help="comma-separated token counts per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (vLLM binds its CPU worker; one core here)")
    ap.add_argument("--layers", type=int, default=30, help="layers in the model (bounds the copies streamed)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    from morphserve.vllm.kernel_speed import fused_shapes, layer_copies, time_layer
    from quant_layers.cpu_kind import last_level_cache_bytes

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    shapes = fused_shapes(SMOLLM2_SHAPES)
    llc = last_level_cache_bytes()
    seconds = {}
    for tier in ("bf16", "w8a8"):
        copies = layer_copies(tier, shapes, args.layers, llc, dtype)
        seconds[tier] = time_layer(tier, shapes, tokens, 32, dtype, copies=copies)
    print(f"| tokens in the step | full precision ({args.dtype}), ms per layer | W8A8, ms per layer | W8A8 / full |")
    print("|---|---|---|---|")
    for t in tokens:
        full, int8 = seconds["bf16"][t] * 1e3, seconds["w8a8"][t] * 1e3
        print(f"| {t} | {full:.2f} | {int8:.2f} | {int8 / full:.2f}x |")
    faster = [t for t in tokens if seconds["w8a8"][t] < seconds["bf16"][t]]
    print(f"W8A8 faster from {min(faster)} tokens on (of those timed)" if faster else "W8A8 never faster here")
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "threads": args.threads, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
