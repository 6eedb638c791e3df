"""What the copy of the bf16 masters costs a restore on vLLM's torch fallback, against
keeping the file map itself (the zero-copy option a restore does not take yet), and against
reading the bytes with `preadv`: into a tensor from torch's allocator per weight (`pread`),
or into one fresh anonymous map per layer (`read`; `read-huge` advises it for transparent
huge pages).

    python scripts/bench_master_copy.py --model .cache/models/SmolLM2-135M-Instruct [--rounds 5]

Reads every decoder linear's weight the way a restore reads it (one safetensors handle per
layer, its views kept until the end, as installed layers keep theirs), either cloning each
weight (what `prepack_bf16` does on the torch path) or keeping the view, with or without
the one-row proof call a restore makes before installing (which touches every page of the
weight). One thread, like the engine's. Only the masters' side of a restore: no engine,
no fused q/k/v (the model's own tensors), no heap trim.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open


def layer_keys(model: Path) -> tuple[Path, dict[int, list[str]]]:
    files = sorted(model.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"bench_master_copy: expected one safetensors file in {model}, found {len(files)}")
    layers: dict[int, list[str]] = {}
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if "layers" in parts and key.endswith("proj.weight"):
                layers.setdefault(int(parts[parts.index("layers") + 1]), []).append(key)
    return files[0], layers


def header(path: Path) -> tuple[int, dict]:
    """The safetensors header (its documented layout: a little-endian u64 length, then JSON):
    safetensors' API gives tensors, not their byte offsets, which a pread needs."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def read_layer(fd: int, base: int, head: dict, keys: list[str], huge: bool) -> list[torch.Tensor]:
    spans = [head[k]["data_offsets"] for k in keys]
    size = sum(b - a for a, b in spans)
    buf = mmap.mmap(-1, size)
    if huge:
        buf.madvise(mmap.MADV_HUGEPAGE)
    view, out, pos = memoryview(buf), [], 0
    for key, (a, b) in zip(keys, spans):
        os.preadv(fd, [view[pos:pos + b - a]], base + a)
        out.append(torch.frombuffer(buf, dtype=torch.bfloat16, count=(b - a) // 2, offset=pos)
                   .view(head[key]["shape"]))
        pos += b - a
    return out


def pread_each(fd: int, base: int, head: dict, keys: list[str]) -> list[torch.Tensor]:
    """One `preadv` per weight into a tensor from torch's own allocator."""
    out = []
    for key in keys:
        a, b = head[key]["data_offsets"]
        t = torch.empty(head[key]["shape"], dtype=torch.bfloat16)
        os.preadv(fd, [t.view(torch.uint8).view(-1).numpy()], base + a)
        out.append(t)
    return out


def one_pass(path: Path, layers: dict[int, list[str]], copy: bool | str, proof: bool) -> float:
    kept = []
    base, head = header(path)
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    for i in sorted(layers):
        if copy == "pread":
            weights = pread_each(fd, base, head, layers[i])
        elif copy in ("read", "read-huge"):
            weights = read_layer(fd, base, head, layers[i], copy == "read-huge")
        else:
            with safe_open(str(path), "pt") as f:
                weights = [f.get_tensor(key) for key in layers[i]]
            if copy:
                weights = [w.clone() for w in weights]
        for weight in weights:
            if proof:
                x = torch.linspace(-1.0, 1.0, weight.shape[1]).to(weight.dtype).unsqueeze(0)
                torch.nn.functional.linear(x, weight)
            kept.append(weight)
    seconds = time.perf_counter() - t0
    os.close(fd)
    del kept
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model folder with one safetensors file")
    ap.add_argument("--rounds", type=int, default=5, help="passes of each kind, alternated (the first is dropped)")
    ap.add_argument("--out", type=Path, default=None, help="write the medians and every pass here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, layers = layer_keys(args.model)
    kinds = [(copy, proof) for proof in (False, True) for copy in (True, False, "pread", "read", "read-huge")]
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds + 1):
        for copy, proof in kinds:
            name = f"{copy if isinstance(copy, str) else 'copy' if copy else 'map'}{' + proof' if proof else ''}"
            runs.setdefault(name, []).append(one_pass(path, layers, copy, proof) * 1000)
    result = {name: {"median_ms": statistics.median(ms[1:]), "range_ms": [min(ms[1:]), max(ms[1:])], "passes_ms": ms}
              for name, ms in runs.items()}
    for name, r in result.items():
        print(f"{name:14s} {r['median_ms']:7.1f} ms  [{r['range_ms'][0]:.1f}, {r['range_ms'][1]:.1f}]  "
              f"({len(layers)} layers)")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
