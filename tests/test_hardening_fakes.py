"""Builders of tiny fake models, twins and packs for the pure hardening tests (no tests here).

A two-layer Llama config with real safetensors headers: open_twin, read_model_info and
check_pack_matches run on them exactly as on a real pack, in milliseconds, without GPTQ.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from morphserve.offline import pack as packfmt
from quant_layers.model_info import LINEAR_NAMES, linear_key, read_model_info

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32,
    "torch_dtype": "bfloat16",
}
GROUP_SIZE = 32


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Import into a test module: verification results of fake models stay in tmp_path."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MORPHSERVE_CACHE", str(path))
    return path


def make_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file({"model.embed_tokens.weight": torch.zeros(32, 64, dtype=torch.bfloat16)},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_twin(folder: Path, model: Path, bits: int = 4, symmetric: bool = True,
              zero_points: bool = False) -> Path:
    """A pack-quantized twin of `model` whose config says `bits`/`symmetric`."""
    info = read_model_info(model)
    folder.mkdir(parents=True)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": GROUP_SIZE, "dynamic": False}
    qcfg = {"format": "pack-quantized", "quant_method": "compressed-tensors", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}}}
    (folder / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": qcfg}))
    tensors = {}
    for layer in range(info.num_layers):
        for name in LINEAR_NAMES:
            out_f, in_f = info.linear_shapes[name]
            prefix = linear_key(layer, name)
            tensors[f"{prefix}.weight_packed"] = torch.zeros(out_f, in_f // (32 // bits), dtype=torch.int32)
            tensors[f"{prefix}.weight_scale"] = torch.ones(out_f, in_f // GROUP_SIZE, dtype=torch.bfloat16)
            tensors[f"{prefix}.weight_shape"] = torch.tensor([out_f, in_f])
            if zero_points:
                tensors[f"{prefix}.weight_zero_point"] = torch.zeros(out_f, in_f // GROUP_SIZE, dtype=torch.int8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_manifest(model: Path, bits: int = 4, group_size: int = GROUP_SIZE) -> packfmt.Manifest:
    info = read_model_info(model)
    n = info.num_layers
    return packfmt.Manifest(
        tool_version="test", model_path=str(model), model_sha256=info.weights_sha256(),
        architecture="LlamaForCausalLM", num_layers=n, bits=bits, group_size=group_size,
        quantization_source="test", swap_order=list(range(n)),
        layer_bytes=[packfmt.LayerBytes(layer=i, fp16=1, quantized=1) for i in range(n)],
    )


def make_pack(folder: Path, model: Path, manifest_bits: int = 4, **twin_kw) -> Path:
    """A pack folder: manifest.json plus quantized/; `manifest_bits` may disagree with the twin."""
    make_twin(folder / packfmt.QUANTIZED_DIR, model, **twin_kw)
    packfmt.write_json(folder / packfmt.MANIFEST, make_manifest(model, bits=manifest_bits).model_dump())
    return folder


def make_w8_twin(folder: Path, model: Path, strategy: str = "channel", dynamic: bool = True,
                 bad_shape: bool = False) -> Path:
    """An int-quantized W8A8 twin of `model` (zeros), in llm-compressor's W8A8 layout."""
    info = read_model_info(model)
    folder.mkdir(parents=True)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False}
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": dynamic}
    qcfg = {"format": "int-quantized", "quant_method": "compressed-tensors", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "format": "int-quantized"}}}
    (folder / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": qcfg}))
    tensors = {}
    for layer in range(info.num_layers):
        for name in LINEAR_NAMES:
            out_f, in_f = info.linear_shapes[name]
            prefix = linear_key(layer, name)
            tensors[f"{prefix}.weight"] = torch.zeros(out_f, in_f + (8 if bad_shape else 0), dtype=torch.int8)
            tensors[f"{prefix}.weight_scale"] = torch.ones(out_f, 1, dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def make_tiered_pack(folder: Path, model: Path, **w8_kw) -> Path:
    """make_pack plus a W8A8 tier whose manifest bytes match the fake twin."""
    make_pack(folder, model)
    make_w8_twin(folder / "quantized-w8a8", model, **w8_kw)
    info = read_model_info(model)
    per_layer = sum(o * i + o * 4 for o, i in (info.linear_shapes[n] for n in LINEAR_NAMES))
    manifest = packfmt.load_manifest(folder)
    manifest.tiers = [packfmt.TierManifest(name="w8a8", format=packfmt.TIER_FORMATS["w8a8"],
                                           quantized_dir="quantized-w8a8", quantization_source="test",
                                           swap_order=list(range(info.num_layers)),
                                           layer_bytes=[per_layer] * info.num_layers)]
    packfmt.write_json(folder / packfmt.MANIFEST, manifest.model_dump())
    return folder
