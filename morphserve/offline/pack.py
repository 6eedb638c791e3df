"""The pack: what `morphserve prepare` writes and the runtime loads.

    PACK_DIR/
      manifest.json     this schema: model identity, format, swap order, per-layer bytes
      importance.json   LTS/LRS/MDS/LIS of every candidate in every greedy round
      quality.json      perplexity against the number of quantized layers, per order
      quantized/        the W4A16 twin: compressed-tensors pack-quantized safetensors,
                        servable by plain vLLM as a static baseline
      quantized-w8a8/   (with --tiers w8a8,w4a16) the W8A8 twin: compressed-tensors
                        int-quantized int8 weights, dynamic per-token int8 activations

The base tier is described by the manifest's top-level fields (so a pack without tiers
reads as before): W4A16 by default, or W8A8 (`base_tier: w8a8`, a *W8A8-only* pack, the
default on CPUs whose vLLM build has no W4A16 kernel). Every further tier is one entry of
`tiers`; only a W4A16 base can have one (W8A8).

A tiered pack is served along a *ladder*: level k is the first k steps of [every layer to
W8A8 in the W8A8 order] + [every layer from W8A8 to W4A16 in the W4A16 order]. Each rung
frees memory; `prepare` measures the ladder's quality at every rung and checks that no
W4A16 step is cheaper, per byte freed, than a W8A8 step it comes after (quality.json).
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
BASE_TIER = "w4a16"
TIER_NAMES = ("w8a8", "w4a16")  # least to most compressed
TIER_FORMATS = {"w8a8": "compressed-tensors/int-quantized", "w4a16": FORMAT}


class TierManifest(BaseModel):
    """One further precision tier of the pack (the base W4A16 tier is the top level)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="'w8a8'")
    format: str
    quantized_dir: str
    quantization_source: str
    swap_order: list[int] = Field(description="layer ids, the most swappable first, for this tier")
    layer_bytes: list[int] = Field(description="bytes of each layer's quantized linears, in layer order")


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
    base_tier: str = Field(default=BASE_TIER, description="the tier the top-level fields describe: w4a16 or w8a8")
    format: str = FORMAT
    quantized_dir: str = QUANTIZED_DIR
    quantization_source: str = Field(description="'gptq (llm-compressor)' or the --quantized path")
    swap_order: list[int] = Field(description="layer ids, the most swappable first (LIS order)")
    layer_bytes: list[LayerBytes]
    tiers: list[TierManifest] = Field(default_factory=list, description="tiers besides the base W4A16 one")
    timings_s: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if sorted(self.swap_order) != list(range(self.num_layers)):
            raise ValueError("swap_order must be a permutation of 0..num_layers-1")
        if [b.layer for b in self.layer_bytes] != list(range(self.num_layers)):
            raise ValueError("layer_bytes must list every layer once, in order")
        if self.base_tier not in TIER_NAMES:
            raise ValueError(f"unknown base_tier {self.base_tier!r} (known: {', '.join(TIER_NAMES)})")
        if self.format != TIER_FORMATS[self.base_tier]:
            raise ValueError(f"base tier {self.base_tier} is stored as {TIER_FORMATS[self.base_tier]}, not {self.format}")
        if self.base_tier != BASE_TIER and self.tiers:
            raise ValueError(f"a {self.base_tier}-only pack has no further tiers")
        for t in self.tiers:
            if t.name not in TIER_NAMES or t.name == BASE_TIER:
                raise ValueError(f"unknown tier {t.name!r} (known: {', '.join(n for n in TIER_NAMES if n != BASE_TIER)})")
            if sorted(t.swap_order) != list(range(self.num_layers)) or len(t.layer_bytes) != self.num_layers:
                raise ValueError(f"tier {t.name}: swap_order and layer_bytes must cover every layer once")
        return self

    def tier(self, name: str) -> TierManifest | None:
        """Any tier of the pack, the base one included (as a view of the top-level fields)."""
        if name == self.base_tier:
            return TierManifest(name=name, format=self.format, quantized_dir=self.quantized_dir,
                                quantization_source=self.quantization_source, swap_order=self.swap_order,
                                layer_bytes=[b.quantized for b in self.layer_bytes])
        return next((t for t in self.tiers if t.name == name), None)

    @property
    def tier_names(self) -> list[str]:
        """Every tier of the pack, least compressed first."""
        have = {t.name for t in self.tiers} | {self.base_tier}
        return [n for n in TIER_NAMES if n in have]


def tier_dirs(pack_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Each tier's checkpoint folder (every one is servable by plain vLLM as a static baseline)."""
    return {name: Path(pack_dir) / manifest.tier(name).quantized_dir for name in manifest.tier_names}


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
