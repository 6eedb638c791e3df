"""What MorphServe needs to know about a Llama-family HF model folder, read without loading it.

Shapes come from config.json and sizes from the safetensors headers, so checking a pack
or a checkpoint against a model costs milliseconds, not a model load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from morphserve.errors import MorphServeError

# The seven linears of a Llama decoder layer, in HF naming; vLLM fuses them into
# qkv_proj and gate_up_proj, which the runtime side maps back.
LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SUPPORTED_ARCHS = ("LlamaForCausalLM",)


def linear_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: dict
    num_layers: int
    linear_shapes: dict[str, tuple[int, int]]  # HF name -> (out_features, in_features)
    weight_files: tuple[Path, ...]
    dtype_bytes: int

    def layer_fp_bytes(self) -> int:
        """Bytes of one decoder layer's linear weights at the model's own dtype (bf16)."""
        return sum(o * i for o, i in self.linear_shapes.values()) * self.dtype_bytes

    def input_sizes(self) -> set[int]:
        return {shape[1] for shape in self.linear_shapes.values()}

    def weights_sha256(self) -> str:
        """Content hash of the weights, so a pack can prove which model it was made from."""
        h = hashlib.sha256()
        for file in self.weight_files:
            h.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


def read_model_info(model_dir: Path) -> ModelInfo:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise MorphServeError(f"model folder {model_dir} does not exist")
    if not cfg_path.is_file():
        raise MorphServeError(f"model folder {model_dir} has no config.json (is it a HF model folder?)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MorphServeError(f"{cfg_path} is not valid JSON: {e}") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise MorphServeError(f"model {model_dir} has architecture {archs}; MorphServe supports {list(SUPPORTED_ARCHS)}")
    if config.get("quantization_config"):
        raise MorphServeError(f"model {model_dir} is already quantized; give the full-precision model")
    files = tuple(sorted(model_dir.glob("*.safetensors")))
    if not files:
        raise MorphServeError(f"model folder {model_dir} holds no .safetensors weights")
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return ModelInfo(
        path=model_dir, config=config, num_layers=int(config["num_hidden_layers"]),
        linear_shapes=shapes, weight_files=files,
        dtype_bytes=4 if dtype == "float32" else 2,
    )


def default_group_size(input_sizes: set[int], candidates: tuple[int, ...] = (128, 64, 32)) -> int:
    """The largest of 128, 64, 32 that divides every linear input size (SmolLM2: 576 -> 64)."""
    for g in candidates:
        if all(size % g == 0 for size in input_sizes):
            return g
    raise MorphServeError(f"no group size in {candidates} divides every input size {sorted(input_sizes)}")


def check_group_size(group_size: int, input_sizes: set[int]) -> None:
    bad = sorted(s for s in input_sizes if s % group_size)
    if bad:
        raise MorphServeError(
            f"--group-size {group_size} does not divide linear input size(s) {bad}; "
            f"use {default_group_size(input_sizes)} (or leave --group-size unset)"
        )
