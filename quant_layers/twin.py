"""The quantized twin: a compressed-tensors `pack-quantized` W4A16 checkpoint of the model.

It is the format vLLM's own mixed-precision path loads (CompressedTensorsWNA16 ->
CPUWNA16 on CPU, Marlin/Machete on CUDA), so what MorphServe swaps in at runtime is
exactly what vLLM computes. This module checks a checkpoint against the model it claims
to twin, and decompresses one decoder layer at a time through compressed-tensors' own
`PackedQuantizationCompressor` (no hand-written int4 unpacking).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quant_layers.errors import QuantLayersError
from quant_layers.mapped_checkpoint import slice_bytes
from quant_layers.model_info import LINEAR_NAMES, ModelInfo, linear_key, verified

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
# The runtime swaps layers through one kernel configuration: vLLM scalar type uint4b8 with
# no zero points (vllm_patches.make_wna16_kernel). Every other twin is refused up front.
SERVED_BITS = 4
SERVED = "the runtime serves symmetric 4-bit (W4A16, no zero points) twins only"
GPTQ_JOB = Path(__file__).with_name("gptq_job.py")


@dataclass
class TwinCheckpoint:
    path: Path
    bits: int
    group_size: int
    symmetric: bool
    scheme: dict  # the config group, as compressed-tensors writes it
    tensors: dict[str, Path]  # tensor name -> safetensors file holding it

    def quantization_scheme(self):
        """compressed-tensors' own model of the scheme, for its decompressor. Built on first
        use, not in `open_twin`: importing compressed-tensors costs ~9 s (it pulls in
        transformers and torch.compile), and `morphserve serve` / `pack check` open the twin
        only to check it."""
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme.model_validate(self.scheme)

    def layer_bytes(self, layer: int) -> int:
        total = 0
        for name in LINEAR_NAMES:
            for suffix in PACKED_SUFFIXES:
                key = f"{linear_key(layer, name)}.{suffix}"
                if key in self.tensors:
                    with safe_open(self.tensors[key], "pt") as f:
                        total += slice_bytes(f.get_slice(key))
        return total

    def dequantized_layer(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Dense weights of one decoder layer's linears, as the W4 kernel sees them."""
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        out: dict[str, torch.Tensor] = {}
        for name in LINEAR_NAMES:
            prefix = linear_key(layer, name)
            state = {}
            for suffix in PACKED_SUFFIXES:
                key = f"{prefix}.{suffix}"
                if key in self.tensors:
                    with safe_open(self.tensors[key], "pt") as f:
                        state[suffix] = f.get_tensor(key)
            dense = PackedQuantizationCompressor.decompress(state, self.quantization_scheme())["weight"]
            out[name] = dense.to(dtype)
        return out


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantLayersError(f"{what} {path.parent} has no {path.name}") from None
    except json.JSONDecodeError as e:
        raise QuantLayersError(f"{path} is not valid JSON: {e}") from None


def model_mismatch(ckpt: Path, config: dict, model: ModelInfo) -> None:
    """Refuse a checkpoint whose config describes another model."""
    for key in ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size"):
        if config.get(key) != model.config.get(key):
            raise QuantLayersError(
                f"quantized checkpoint {ckpt} is for a different model: "
                f"{key} is {config.get(key)!r}, the model has {model.config.get(key)!r}"
            )


def index_safetensors(folder: Path) -> dict[str, Path]:
    """Map every tensor name to its file, opening each file so corruption surfaces here."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QuantLayersError(f"{folder} holds no .safetensors files")
    index: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    index[key] = file
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise QuantLayersError(f"corrupt safetensors file {file}: {e}") from None
    return index


def open_twin(ckpt: Path, model: ModelInfo) -> TwinCheckpoint:
    """Open a W4A16 checkpoint and prove it twins `model`: same architecture, same shapes."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise QuantLayersError(f"quantized checkpoint {ckpt} does not exist or is not a folder")
    config = read_json(ckpt / "config.json", "quantized checkpoint")
    model_mismatch(ckpt, config, model)
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("format") != "pack-quantized" or not qcfg.get("config_groups"):
        raise QuantLayersError(
            f"quantized checkpoint {ckpt} is not compressed-tensors pack-quantized "
            f"(format={qcfg.get('format')!r}); MorphServe needs W4A16 pack-quantized weights"
        )
    group = next(iter(qcfg["config_groups"].values()))
    w = _weight_args(ckpt, group)
    tensors = index_safetensors(ckpt)
    # Every process of one start-up opens the twin; its shapes are checked once per change
    # of its files (or of the model's shapes), not once per process.
    model_key = json.dumps([model.num_layers, sorted(model.linear_shapes.items())])
    verified("twin-shapes", (*sorted(set(tensors.values())), ckpt / "config.json"), model_key,
             lambda: _check_shapes(ckpt, tensors, model, w.num_bits))
    return TwinCheckpoint(
        path=ckpt, bits=w.num_bits, group_size=w.group_size, symmetric=w.symmetric,
        scheme=group, tensors=tensors,
    )


@dataclass(frozen=True)
class WeightArgs:
    num_bits: int
    group_size: int
    symmetric: bool


def _weight_args(ckpt: Path, group: object) -> WeightArgs:
    """The fields of a compressed-tensors config group the runtime depends on, read from the
    JSON directly (see TwinCheckpoint.quantization_scheme for why not through the library).
    Only what compressed-tensors itself would default is defaulted."""
    bad = f"quantized checkpoint {ckpt} is not weight-only grouped (W4A16) quantization"
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict) or group.get("input_activations"):
        raise QuantLayersError(bad)
    w = group["weights"]
    bits, size, sym = w.get("num_bits", 8), w.get("group_size"), w.get("symmetric", True)
    if w.get("type", "int") != "int" or w.get("strategy", "group") != "group":
        raise QuantLayersError(f"{bad}: weights are {w.get('type')!r} {w.get('strategy')!r}")
    if type(bits) is not int or type(size) is not int or size <= 0 or type(sym) is not bool:
        raise QuantLayersError(f"{bad}: num_bits={bits!r}, group_size={size!r}, symmetric={sym!r}")
    return WeightArgs(bits, size, sym)


def _check_shapes(ckpt: Path, tensors: dict[str, Path], model: ModelInfo, bits: int) -> str:
    """Every linear's logical and packed shape against the model's; each file opened once
    (a header parse per tensor would cost seconds on a 70B twin)."""
    with ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, "pt")) for file in sorted(set(tensors.values()))}
        for layer in range(model.num_layers):
            for name in LINEAR_NAMES:
                prefix = linear_key(layer, name)
                for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                    if f"{prefix}.{suffix}" not in tensors:
                        raise QuantLayersError(f"quantized checkpoint {ckpt} lacks tensor {prefix}.{suffix}")
                shape_key, packed_key = f"{prefix}.weight_shape", f"{prefix}.weight_packed"
                shape = tuple(int(x) for x in handles[tensors[shape_key]].get_tensor(shape_key).tolist())
                packed_shape = tuple(handles[tensors[packed_key]].get_slice(packed_key).get_shape())
                expected = model.linear_shapes[name]
                if shape != expected or packed_shape != (expected[0], expected[1] // (32 // bits)):
                    raise QuantLayersError(
                        f"quantized checkpoint {ckpt} does not match the model: {prefix} has shape "
                        f"{shape} (packed {packed_shape}), the model has {expected}"
                    )
    return "ok"


def check_servable_twin(tw: TwinCheckpoint) -> None:
    """An 8-bit or asymmetric twin would load into the uint4b8 kernel and compute wrong
    numbers without any error, so it must be stopped before it is served."""
    where = f"quantized checkpoint {tw.path}"
    if tw.bits != SERVED_BITS:
        raise QuantLayersError(f"{where}: twin is {tw.bits}-bit; {SERVED}")
    if not tw.symmetric:
        raise QuantLayersError(f"{where}: twin is asymmetric (symmetric: false); {SERVED}")
    if any(key.endswith(".weight_zero_point") for key in tw.tensors):
        raise QuantLayersError(f"{where}: twin is asymmetric (it holds zero points, weight_zero_point); {SERVED}")


def quant_python() -> Path:
    """The interpreter of the llm-compressor environment the Makefile builds."""
    env = os.environ.get("MORPHSERVE_QUANT_PYTHON")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / ".venv-quant" / "bin" / "python"
    if not path.exists():
        raise QuantLayersError(
            f"llm-compressor environment not found at {path}; run `make setup`, set "
            "MORPHSERVE_QUANT_PYTHON, or pass --quantized with an existing W4A16 checkpoint"
        )
    return path


def run_gptq(model_dir: Path, out: Path, bits: int, group_size: int | None, calib: Path,
             samples: int, seq_len: int, scheme: str = "w4a16", method: str = "gptq",
             compute_dtype: str = "bf16") -> None:
    """Calibrated quantization via llm-compressor, in its own environment (see gptq_job.py);
    `compute_dtype` "fp32" runs its calibration forwards in fp32 (the checkpoint stays bf16)."""
    cmd = [str(quant_python()), str(GPTQ_JOB), "--model", str(model_dir), "--out", str(out),
           "--scheme", scheme, "--method", method, "--calib", str(calib),
           "--samples", str(samples), "--seq-len", str(seq_len), "--compute-dtype", compute_dtype]
    if scheme == "w4a16":
        cmd += ["--bits", str(bits), "--group-size", str(group_size)]
    # Per-module INFO/METRIC lines drown the progress bars; set LLM_COMPRESSOR_LOG_LEVEL to see them.
    env = {"LLM_COMPRESSOR_LOG_LEVEL": "WARNING", **os.environ, "PYTHONPATH": ""}
    # Its progress bars go straight to the user's terminal; stdout is folded into stderr so
    # that MorphServe's own stdout stays machine-readable.
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if proc.returncode != 0:
        label = {"gptq": "GPTQ", "rtn": "round-to-nearest", "smoothquant-gptq": "SmoothQuant+GPTQ"}[method]
        raise QuantLayersError(f"llm-compressor {label} failed ({scheme.upper()}, exit {proc.returncode}); "
                               "its output is above")
