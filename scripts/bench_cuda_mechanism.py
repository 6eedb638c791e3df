"""The CUDA backend's two mechanisms, measured on a GPU without vLLM (issue: CUDA backend).

1. A layer swap's copy: one Llama-2-7B decoder layer's linears, pinned host -> device, on
   a side stream, in bf16 (a restore) and in W4A16 g128 (a quantize: packed int4 plus one
   bf16 scale per group). Reported as seconds and GB/s, beside the measured host-to-device
   bandwidth of a large pinned copy (the practical PCIe / C2C limit of this machine).
2. The KV side: CUDA virtual-memory map / write / read / unmap of KV pages through
   kv_resize.cuda_backing (cuMemCreate / cuMemMap), per chunk size.
3. The tiers' speed on this GPU, the question `prepare` asks a CPU before it builds a ladder:
   one layer's four fused linears (qkv, o, gate_up, down) at decode and prompt batch sizes,
   in bf16, in int8 W8A8 (per-token dynamic activation scales, cuBLASLt's int8 GEMM through
   `torch._int_mm`) and in FP8 W8A8 (e4m3, row-wise scales, `torch._scaled_mm`). vLLM is not
   on the GPU image, so these are torch's kernels, not vLLM's CUTLASS ones: each quantized
   tier is timed as its GEMM alone and with its activation quantization in unfused torch
   ops (vLLM fuses it; the truth lies between). Timed with CUDA events, weights cycled over
   enough copies to stream from HBM as a decode step does.
4. Whether a swap's copy slows the step it overlaps: a decode-like stream of bf16 linears at
   batch 32 timed alone and while a bf16 layer copies host -> device on a side stream.

Needs only torch with CUDA (and cuda-python for part 2); it imports nothing of vLLM, so it
runs on a bare GPU image. Without a GPU it stops with one line; `--dry-run` prints the
plan (sizes) on any machine. Each part that fails is recorded as its error, and the others
still run.

  python scripts/bench_cuda_mechanism.py --out out/cuda-mechanism.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kv_resize.capacity import LLAMA_2_7B, w4_bytes  # noqa: E402

GROUP = 128


def plan(repeats: int) -> dict:
    params = LLAMA_2_7B.layer_linear_params
    return {"model": LLAMA_2_7B.name, "layer_linear_params": params, "bf16_bytes": 2 * params,
            "w4a16_g128_bytes": w4_bytes(params, GROUP), "repeats": repeats,
            "vmm_chunks_mib": [2, 16, 64, 256], "tier_batches": TIER_BATCHES,
            "fused_shapes": {k: list(v) for k, v in fused_shapes().items()}}


TIER_BATCHES = [1, 8, 32, 128, 512, 2048]


def fused_shapes() -> dict[str, tuple[int, int]]:
    """Llama-2-7B's fused linears as vLLM runs them: (out_features, in_features).
    `morphserve.vllm.kernel_speed.fused_shapes` derives the same from a model's config, but it
    imports vLLM, which the GPU image this script runs on does not have."""
    s = LLAMA_2_7B
    kv = s.num_kv_heads * s.head_dim
    return {"qkv": (s.hidden + 2 * kv, s.hidden), "o": (s.hidden, s.hidden),
            "gate_up": (2 * s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}


def _copy_seconds(nbytes: int, repeats: int) -> list[float]:
    """Pinned host -> device on a side stream, as a swap would copy; median of `repeats`."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    times = []
    for _ in range(repeats + 1):  # the first copy warms up the path and is dropped
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            dev.copy_(host, non_blocking=True)
        stream.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


def measure(p: dict) -> dict:
    import torch

    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **p, "copy": {}}
    for name in ("bf16_bytes", "w4a16_g128_bytes"):
        t = statistics.median(_copy_seconds(p[name], p["repeats"]))
        out["copy"][name.removesuffix("_bytes")] = {"seconds": t, "gb_per_s": p[name] / t / 1e9}
    big = 2 * 2**30
    t = statistics.median(_copy_seconds(big, p["repeats"]))
    out["copy"]["pinned_2GiB_reference"] = {"seconds": t, "gb_per_s": big / t / 1e9}
    try:
        from kv_resize.cuda_backing import time_mechanism

        out["vmm"] = [time_mechanism(4 * mib * 2**20, mib * 2**20) for mib in p["vmm_chunks_mib"]]
    except ImportError as e:
        out["vmm"] = f"not measured: cuda-python is not installed ({e})"
    except Exception as e:  # one part's failure must not lose the others' figures
        out["vmm"] = f"failed: {type(e).__name__}: {e}"
    for key, part in (("tiers", measure_tiers), ("overlap", measure_overlap)):
        try:
            out[key] = part(p)
        except Exception as e:
            out[key] = f"failed: {type(e).__name__}: {e}"
    return out


def _event_ms(fn, iters: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean milliseconds per call of `iters` back-to-back calls."""
    import torch

    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / iters)
    return statistics.median(per_call)


def _layer_weights(copies: int):
    """`copies` independent sets of one layer's fused linears in bf16, int8 (with per-channel
    scales) and fp8 e4m3 (with per-channel scales), all on the device; cycling through the
    copies keeps each call's weights out of the 60 MB L2, as in a decode step over 32 layers."""
    import torch

    sets = []
    for _ in range(copies):
        layer = {}
        for name, (n, k) in fused_shapes().items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            amax = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8)
            w8 = (w.float() / (amax / 127)).round().clamp(-127, 127).to(torch.int8)
            f8 = (w.float() / (amax / 448)).to(torch.float8_e4m3fn)
            layer[name] = {"bf16": w, "int8_t": w8.t(), "int8_scale": (amax / 127).t().contiguous(),
                           "fp8_t": f8.t(), "fp8_scale": (amax / 448).t().contiguous()}
        sets.append(layer)
    return sets


def _linear(tier: str, x, w: dict, with_quant: bool, xq=None):
    """One linear in `tier`; `xq` is the pre-quantized activation for the GEMM-only figure."""
    import torch

    if tier == "bf16":
        return x @ w["bf16"].t()
    if tier == "int8":
        if with_quant:
            sx = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127
            q = (x.float() / sx).round().clamp(-127, 127).to(torch.int8)
            return (torch._int_mm(q, w["int8_t"]).float() * sx * w["int8_scale"]).to(torch.bfloat16)
        return torch._int_mm(xq[0], w["int8_t"])
    if with_quant:
        sx = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 448
        q = (x.float() / sx).to(torch.float8_e4m3fn)
    else:
        q, sx = xq
    return torch._scaled_mm(q, w["fp8_t"], scale_a=sx, scale_b=w["fp8_scale"], out_dtype=torch.bfloat16)


def measure_tiers(p: dict) -> dict:
    """Milliseconds per layer (four fused linears) per tier and batch; int8's GEMM needs more
    than 16 rows in cuBLASLt, so smaller batches are padded to 17 and say so."""
    import torch

    copies = 4  # 4 x 404 MB of bf16 weights cycled: far beyond the L2
    sets = _layer_weights(copies)
    rows = []
    for batch in p["tier_batches"]:
        m_int8 = max(batch, 17)
        row = {"batch": batch, "int8_rows": m_int8}
        xs = {n: torch.randn(batch, k, device="cuda", dtype=torch.bfloat16) for n, (_, k) in fused_shapes().items()}
        xs_int8 = {n: x if batch >= 17 else torch.cat([x, x.new_zeros(m_int8 - batch, x.shape[1])]) for n, x in xs.items()}
        state = {"i": 0}

        def step(tier: str, with_quant: bool, pre: dict | None = None):
            layer = sets[state["i"] % copies]
            state["i"] += 1
            inputs = xs_int8 if tier == "int8" else xs
            for name in layer:
                _linear(tier, inputs[name], layer[name], with_quant, None if pre is None else pre[name])

        pre8 = {n: (torch.ones(m_int8, k, device="cuda", dtype=torch.int8),)
                for n, (_, k) in fused_shapes().items()}
        pref8 = {n: (torch.ones(batch, k, device="cuda").to(torch.float8_e4m3fn),
                     torch.ones(batch, 1, device="cuda")) for n, (_, k) in fused_shapes().items()}
        iters = 40 if batch <= 128 else 10
        for key, tier, quant, pre in (("bf16", "bf16", False, None), ("int8_gemm", "int8", False, pre8),
                                      ("int8_with_quant", "int8", True, None), ("fp8_gemm", "fp8", False, pref8),
                                      ("fp8_with_quant", "fp8", True, None)):
            try:
                row[f"{key}_ms"] = _event_ms(lambda: step(tier, quant, pre), iters)  # noqa: B023 (called at once)
            except Exception as e:  # a kernel this torch lacks for a shape: say so, keep the rest
                row[f"{key}_ms"] = None
                row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for key in ("int8_gemm", "int8_with_quant", "fp8_gemm", "fp8_with_quant"):
            if row.get(f"{key}_ms") and row.get("bf16_ms"):
                row[f"{key}_speed_vs_bf16"] = row["bf16_ms"] / row[f"{key}_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    del sets
    torch.cuda.empty_cache()
    return {"copies_cycled": copies, "rows": rows}


def measure_overlap(p: dict) -> dict:
    """A decode-like stream (32 layers' bf16 linears at batch 32, weights cycled from HBM) timed
    alone, and while one bf16 layer copies pinned host -> device on a side stream."""
    import torch

    sets = _layer_weights(4)
    xs = {n: torch.randn(32, k, device="cuda", dtype=torch.bfloat16) for n, (_, k) in fused_shapes().items()}

    def decode_step():
        for i in range(LLAMA_2_7B.num_layers):
            layer = sets[i % 4]
            for name in layer:
                xs[name] @ layer[name]["bf16"].t()

    step_alone = _event_ms(decode_step, 5)
    nbytes = p["bf16_bytes"]
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    copy_alone = statistics.median(_copy_seconds(nbytes, 5)) * 1e3
    steps = max(1, math.ceil(copy_alone / step_alone))  # decode steps the copy spans when alone
    during, copy_during = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            c0.record()
            dev.copy_(host, non_blocking=True)
            c1.record()
        s0.record()
        for _ in range(steps):
            decode_step()
        s1.record()
        torch.cuda.synchronize()
        during.append(s0.elapsed_time(s1) / steps)
        copy_during.append(c0.elapsed_time(c1))
    return {"decode_step_batch32_alone_ms": step_alone,
            "decode_step_batch32_during_copy_ms": statistics.median(during),
            "steps_overlapped": steps, "step_slowdown": statistics.median(during) / step_alone,
            "layer_copy_alone_ms": copy_alone, "layer_copy_during_decode_ms": statistics.median(copy_during)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="timed copies per size; the median is reported")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON (default: stdout only)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (sizes) and exit; needs no GPU")
    args = ap.parse_args()
    p = plan(args.repeats)
    if args.dry_run:
        print(json.dumps(p, indent=1))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: needs a CUDA device (torch.cuda.is_available() is False); --dry-run shows the plan",
              file=sys.stderr)
        return 2
    result = measure(p)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
