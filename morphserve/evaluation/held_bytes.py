"""The weight bytes a static quantized checkpoint's engine holds, for its KV at a suite's budget.

Every system of a suite gets weights + KV = the budget, its weights as its engine holds them.
A static W8A8 checkpoint stores int8 weights with bf16 per-channel scales, but vLLM's CPU int8
kernel holds the scales in fp32 and, on its oneDNN path, an fp32 `azp_adj` row per fused
linear: the bytes MorphServe's own budget charges its W8A8 twins
(`morphserve.vllm.kernels.int8_held_bytes`). Sized from its file alone, static W8A8 got those
bytes as KV beyond the budget (0.9 MB on SmolLM2-135M, one 128-token block at 329 MB).
Plain Python over the safetensors headers; the per-linear figure comes in as `held`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# How vLLM fuses a Llama layer's linears (its packed_modules_mapping): one kernel each.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def int8_linears(model_dir: Path, float_width: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """The stored bytes of every int8 weight and its scale (floats counted at `float_width`,
    as `model_weight_bytes` counts them), and each linear's (out, in) as vLLM fuses them."""
    from safetensors import safe_open

    from quant_layers.mapped_checkpoint import slice_bytes

    stored, shapes = 0, {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                prefix = key.removesuffix(".weight")
                if prefix == key or f"{prefix}.weight_scale" not in keys:
                    continue
                weight = f.get_slice(key)
                if weight.get_dtype() != "I8":
                    continue
                stored += slice_bytes(weight) + slice_bytes(f.get_slice(f"{prefix}.weight_scale"), float_width)
                parent, _, name = prefix.rpartition(".")
                out, inp = weight.get_shape()
                fused = f"{parent}.{FUSED.get(name, name)}"
                prev = shapes.get(fused, (0, inp))
                shapes[fused] = (prev[0] + out, inp)
    return stored, list(shapes.values())


def engine_weight_bytes(model_dir: Path, dtype: str | None, held: Callable[[int, int], int]) -> int:
    """`model_weight_bytes` with every int8 linear counted as the engine's kernel holds it
    (`held(out, in)`) instead of as stored."""
    from morphserve.runtime.kv_sizing import float_width, model_weight_bytes

    stored, linears = int8_linears(model_dir, float_width(dtype))
    return model_weight_bytes(model_dir, dtype) - stored + sum(held(out, inp) for out, inp in linears)
