"""The CUDA backend's two mechanisms, measured on a GPU without vLLM (issue: CUDA backend).

1. A layer swap's copy: one Llama-2-7B decoder layer's linears, pinned host -> device, on
   a side stream, in bf16 (a restore) and in W4A16 g128 (a quantize: packed int4 plus one
   bf16 scale per group). Reported as seconds and GB/s, beside the measured host-to-device
   bandwidth of a large pinned copy (the practical PCIe / C2C limit of this machine).
2. The KV side: CUDA virtual-memory map / write / read / unmap of KV pages through
   kv_resize.cuda_backing (cuMemCreate / cuMemMap), per chunk size.

Needs only torch with CUDA (and cuda-python for part 2); it imports nothing of vLLM, so it
runs on a bare GPU image. Without a GPU it stops with one line; `--dry-run` prints the
plan (sizes) on any machine. This has not been run yet: no GPU was lent when it was written.

  python scripts/bench_cuda_mechanism.py --out out/cuda-mechanism.json
"""

from __future__ import annotations

import argparse
import json
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
            "vmm_chunks_mib": [2, 16, 64, 256]}


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
    return out


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
