"""The pack: what `morphserve prepare` writes and the runtime loads.

    PACK_DIR/
      manifest.json     this schema: model identity, format, swap order, per-layer bytes
      importance.json   LTS/LRS/MDS/LIS of every candidate in every greedy round
      quality.json      perplexity against the number of quantized layers, per order
      quantized/        the W4A16 twin: compressed-tensors pack-quantized safetensors,
                        servable by plain vLLM as a static baseline
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from morphserve.errors import MorphServeError, first_field_error

MANIFEST = "manifest.json"
IMPORTANCE = "importance.json"
QUALITY = "quality.json"
QUANTIZED_DIR = "quantized"
FORMAT = "compressed-tensors/pack-quantized"


class LayerBytes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int
    fp16: int = Field(description="bytes of the layer's linear weights at full precision (bf16)")
    quantized: int = Field(description="bytes of the packed weights, scales and shapes")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    tool: str = "morphserve"
    tool_version: str
    model_path: str
    model_sha256: str
    architecture: str
    num_layers: int
    bits: int
    group_size: int
    format: str = FORMAT
    quantized_dir: str = QUANTIZED_DIR
    quantization_source: str = Field(description="'gptq (llm-compressor)' or the --quantized path")
    swap_order: list[int] = Field(description="layer ids, the most swappable first (LIS order)")
    layer_bytes: list[LayerBytes]
    timings_s: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if sorted(self.swap_order) != list(range(self.num_layers)):
            raise ValueError("swap_order must be a permutation of 0..num_layers-1")
        if [b.layer for b in self.layer_bytes] != list(range(self.num_layers)):
            raise ValueError("layer_bytes must list every layer once, in order")
        return self


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_manifest(pack_dir: Path) -> Manifest:
    path = Path(pack_dir) / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise MorphServeError(f"{pack_dir} is not a MorphServe pack: {MANIFEST} is missing") from None
    except ValidationError as e:
        where, msg, _, _ = first_field_error(e)
        raise MorphServeError(f"{path}: invalid manifest at {where or '(root)'}: {msg}") from None
