"""The W8A8 twin: a compressed-tensors `int-quantized` checkpoint (llm-compressor's W8A8
preset): int8 weights with one scale per output channel, int8 activations quantized per
token at run time. vLLM serves it through `CompressedTensorsW8A8Int8` ->
`choose_scaled_mm_linear_kernel` (CPUInt8ScaledMMLinearKernel on CPU); the runtime builds
exactly that kernel per layer. This module checks such a checkpoint against the model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quant_layers.errors import QuantLayersError
from quant_layers.model_info import LINEAR_NAMES, ModelInfo, linear_key, verified
from quant_layers.twin import index_safetensors, model_mismatch, read_json

SERVED = ("the runtime serves W8A8 twins with symmetric per-channel int8 weights and dynamic "
          "symmetric per-token int8 activations only (llm-compressor's W8A8 preset)")


@dataclass
class W8Checkpoint:
    path: Path
    tensors: dict[str, Path]

    def layer_bytes(self, layer: int) -> int:
        """int8 weights plus their fp32 per-channel scales, as vLLM's int8 kernel holds them."""
        total = 0
        for name in LINEAR_NAMES:
            key = f"{linear_key(layer, name)}.weight"
            with safe_open(self.tensors[key], "pt") as f:
                rows, cols = f.get_slice(key).get_shape()
            total += rows * cols + rows * 4
        return total

    def dequantized_layer(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Dense weights of one decoder layer's linears: int8 x per-channel scale."""
        out = {}
        for name in LINEAR_NAMES:
            prefix = linear_key(layer, name)
            with safe_open(self.tensors[f"{prefix}.weight"], "pt") as f:
                w = f.get_tensor(f"{prefix}.weight")
            with safe_open(self.tensors[f"{prefix}.weight_scale"], "pt") as f:
                s = f.get_tensor(f"{prefix}.weight_scale")
            out[name] = (w.float() * s.float()).to(dtype)
        return out


def open_w8_twin(ckpt: Path, model: ModelInfo) -> W8Checkpoint:
    """Open a W8A8 checkpoint and prove it twins `model`: same architecture, same shapes,
    the one scheme the runtime serves."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise QuantLayersError(f"W8A8 checkpoint {ckpt} does not exist or is not a folder")
    config = read_json(ckpt / "config.json", "W8A8 checkpoint")
    model_mismatch(ckpt, config, model)
    qcfg = config.get("quantization_config") or {}
    groups = list((qcfg.get("config_groups") or {}).values())
    if qcfg.get("format") != "int-quantized" or len(groups) != 1:
        raise QuantLayersError(f"W8A8 checkpoint {ckpt} is not compressed-tensors int-quantized "
                               f"(format={qcfg.get('format')!r}); {SERVED}")
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    ok = (w.get("num_bits") == 8 and w.get("symmetric") and w.get("strategy") == "channel"
          and a.get("num_bits") == 8 and a.get("symmetric") and a.get("strategy") == "token" and a.get("dynamic"))
    if not ok:
        raise QuantLayersError(f"W8A8 checkpoint {ckpt}: {SERVED}")
    tensors = index_safetensors(ckpt)
    model_key = json.dumps([model.num_layers, sorted(model.linear_shapes.items())])
    verified("w8-twin-shapes", (*sorted(set(tensors.values())), ckpt / "config.json"), model_key,
             lambda: _check_shapes(ckpt, tensors, model))
    return W8Checkpoint(path=ckpt, tensors=tensors)


def _check_shapes(ckpt: Path, tensors: dict[str, Path], model: ModelInfo) -> str:
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, "pt")) for f in sorted(set(tensors.values()))}
        for layer in range(model.num_layers):
            for name in LINEAR_NAMES:
                prefix = linear_key(layer, name)
                for suffix in ("weight", "weight_scale"):
                    if f"{prefix}.{suffix}" not in tensors:
                        raise QuantLayersError(f"W8A8 checkpoint {ckpt} lacks tensor {prefix}.{suffix}")
                w = handles[tensors[f"{prefix}.weight"]].get_slice(f"{prefix}.weight")
                s = handles[tensors[f"{prefix}.weight_scale"]].get_slice(f"{prefix}.weight_scale")
                expected = model.linear_shapes[name]
                if (tuple(w.get_shape()) != expected or w.get_dtype() != "I8"
                        or tuple(s.get_shape()) != (expected[0], 1)):
                    raise QuantLayersError(
                        f"W8A8 checkpoint {ckpt} does not match the model: {prefix} has int8 weight "
                        f"{tuple(w.get_shape())} ({w.get_dtype()}) and scale {tuple(s.get_shape())}, "
                        f"the model needs {expected} and ({expected[0]}, 1)")
    return "ok"
