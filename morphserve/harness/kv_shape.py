"""A model's KV cache size per token and per block, from its config.json.

Tests and benchmarks size vLLM's KV cache in whole blocks (`--kv-cache-memory-bytes` =
N blocks) to get an exact schedule; the block's bytes follow from the architecture, so
they are derived here rather than written down per model. Pure: reads one JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

# vLLM's CPU backend uses 128-token KV blocks by default: vllm/platforms/cpu.py (0.32) sets
# block_size = 128 unless --block-size is given (GPU backends default to 16). MorphServe,
# its tests and benchmarks never pass --block-size.
CPU_BLOCK_TOKENS = 128

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def kv_bytes_per_token(model_dir: str | Path, dtype: str | None = None) -> int:
    """K and V of every layer for one token: 2 x layers x KV heads x head dim x dtype bytes.
    `dtype` is what the engine serves; default the checkpoint's own (torch_dtype, or
    dtype in newer transformers)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dtype = dtype or config.get("torch_dtype") or config["dtype"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def kv_block_bytes(model_dir: str | Path, dtype: str | None = None, block_tokens: int = CPU_BLOCK_TOKENS) -> int:
    """Bytes of one KV block (all layers) as vLLM's CPU backend allocates it."""
    return block_tokens * kv_bytes_per_token(model_dir, dtype)
