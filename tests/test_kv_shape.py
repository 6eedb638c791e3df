"""KV bytes per token and per block from a model's config.json (morphserve/harness/kv_shape.py)."""

from __future__ import annotations

import json

import pytest

from morphserve.harness.kv_shape import CPU_BLOCK_TOKENS, kv_block_bytes, kv_bytes_per_token
from morphserve.offline.default_model import default_model_dir

# SmolLM2-135M: 30 layers x (K, V) x 3 KV heads x head dim 64 x 128-token block x bf16
SMOLLM2_BLOCK_BYTES = 30 * 2 * 3 * 64 * 128 * 2


def test_smollm2_block_from_the_cached_model():
    model = default_model_dir()
    if not (model / "config.json").is_file():
        pytest.skip(f"no converted default model at {model} (run `make setup`)")
    assert CPU_BLOCK_TOKENS == 128
    assert kv_block_bytes(model) == SMOLLM2_BLOCK_BYTES
    assert kv_block_bytes(model, "bfloat16") == SMOLLM2_BLOCK_BYTES


def test_a_synthetic_config_with_head_dim_and_torch_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 30, "num_key_value_heads": 3, "num_attention_heads": 9, "hidden_size": 576,
        "head_dim": 64, "torch_dtype": "bfloat16"}))
    assert kv_bytes_per_token(tmp_path) == 2 * 30 * 3 * 64 * 2
    assert kv_block_bytes(tmp_path) == SMOLLM2_BLOCK_BYTES
    assert kv_block_bytes(tmp_path, "float32") == 2 * SMOLLM2_BLOCK_BYTES
    assert kv_block_bytes(tmp_path, block_tokens=16) == SMOLLM2_BLOCK_BYTES // 8


def test_head_dim_defaults_to_hidden_over_heads_and_kv_heads_to_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "dtype": "float16"}))
    assert kv_bytes_per_token(tmp_path) == 2 * 2 * 4 * 64 * 2
