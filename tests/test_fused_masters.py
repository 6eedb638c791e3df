"""The fused-master cache: q/k/v (gate/up) fused once, mapped at restore, rebuilt when it
does not match the model."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from quant_layers.fused_masters import open_fused_masters
from quant_layers.mapped_checkpoint import MappedCheckpoint

FUSED = {"layers.0.self_attn.qkv_proj": (0, "self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj")),
         "layers.0.self_attn.o_proj": (0, "self_attn.o_proj", ("self_attn.o_proj",))}


def _model(tmp_path, rows_k: int = 2):
    q = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    k = -torch.arange(rows_k * 4, dtype=torch.bfloat16).reshape(rows_k, 4)
    o = torch.ones(4, 4, dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
               "model.layers.0.self_attn.o_proj.weight": o}, str(path))
    masters = MappedCheckpoint({key: path for key in ("model.layers.0.self_attn.q_proj.weight",
                                                      "model.layers.0.self_attn.k_proj.weight",
                                                      "model.layers.0.self_attn.o_proj.weight")})
    return masters, torch.cat([q, k], 0)


def test_only_multi_part_linears_are_cached_and_hold_vllms_row_concatenation(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    masters, want = _model(tmp_path)
    cache = open_fused_masters(masters, tmp_path, torch.bfloat16, FUSED)
    assert set(cache.index) == {"layers.0.self_attn.qkv_proj.weight"}
    with cache.reading() as r:
        assert torch.equal(r.get("layers.0.self_attn.qkv_proj.weight"), want)


def test_a_cache_that_does_not_match_the_model_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    masters, _ = _model(tmp_path)
    cache = open_fused_masters(masters, tmp_path, torch.bfloat16, FUSED)
    (path,) = cache.files()
    # Same names, wrong contents' shape (as if written for another model with the same key).
    save_file({"layers.0.self_attn.qkv_proj.weight": torch.zeros(2, 4, dtype=torch.bfloat16)}, str(path),
              metadata={"attrs": '{"layers.0.self_attn.qkv_proj": {"parts": []}}'})
    cache = open_fused_masters(masters, tmp_path, torch.bfloat16, FUSED)
    with cache.reading() as r:
        assert r.get("layers.0.self_attn.qkv_proj.weight").shape == (5, 4)
    path.write_bytes(b"\x00not a safetensors file")  # corrupt: rebuilt, never trusted
    cache = open_fused_masters(masters, tmp_path, torch.bfloat16, FUSED)
    with cache.reading() as r:
        assert r.get("layers.0.self_attn.qkv_proj.weight").shape == (5, 4)


def test_nothing_fused_means_no_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    masters, _ = _model(tmp_path)
    single = {k: v for k, v in FUSED.items() if "o_proj" in k}
    assert open_fused_masters(masters, tmp_path, torch.bfloat16, single) is None
    assert not (tmp_path / "cache").exists()


def test_an_engine_in_another_dtype_gets_every_linear_cast_once(tmp_path, monkeypatch):
    """fp32 serving (where bf16 is emulated): single linears are cached too, in fp32, so a
    restore prepacks from a map instead of casting a fresh copy each time."""
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    masters, want = _model(tmp_path)
    cache = open_fused_masters(masters, tmp_path, torch.float32, FUSED)
    assert set(cache.index) == {"layers.0.self_attn.qkv_proj.weight", "layers.0.self_attn.o_proj.weight"}
    with cache.reading() as r:
        qkv, o = r.get("layers.0.self_attn.qkv_proj.weight"), r.get("layers.0.self_attn.o_proj.weight")
        assert qkv.dtype == o.dtype == torch.float32
        assert torch.equal(qkv, want.float()) and torch.equal(o, torch.ones(4, 4))
