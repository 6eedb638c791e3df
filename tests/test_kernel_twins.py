"""The kernel-layout twin cache: built once, reused, rebuilt when stale or corrupt."""

from __future__ import annotations

import torch

from quant_layers.kernel_twins import ensure_kernel_twins, kernel_attrs


def _builder(calls: list):
    def build(name):
        calls.append(name)
        return {"weight_packed": torch.arange(8, dtype=torch.int32)}, {"isa_hint": "vec", "params": ["weight_packed"]}
    return build


def test_built_once_then_reused(tmp_path):
    path, calls = tmp_path / "k.safetensors", []
    ckpt = ensure_kernel_twins(path, ["a", "b"], _builder(calls))
    assert calls == ["a", "b"] and set(ckpt.index) == {"a.weight_packed", "b.weight_packed"}
    ensure_kernel_twins(path, ["a", "b"], _builder(calls))
    assert calls == ["a", "b"]  # not rebuilt
    assert kernel_attrs(path)["a"]["isa_hint"] == "vec"
    with ckpt.reading() as r:
        assert r.get("b.weight_packed").tolist() == list(range(8))


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path):
    path, calls = tmp_path / "k.safetensors", []
    path.write_bytes(b"\x00garbage")
    ensure_kernel_twins(path, ["a"], _builder(calls))
    assert calls == ["a"]
    ensure_kernel_twins(path, ["a", "c"], _builder(calls))  # another set of linears: stale
    assert calls == ["a", "a", "c"]
    assert not list(tmp_path.glob("*.tmp"))


def test_changed_contents_with_the_same_size_and_mtime_are_rebuilt(tmp_path):
    """The key is made of paths, sizes and mtimes; the bytes served are checked by hash."""
    import os

    path, calls = tmp_path / "k.safetensors", []
    ensure_kernel_twins(path, ["a"], _builder(calls))
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight byte, in the tensor data after the header
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    ckpt = ensure_kernel_twins(path, ["a"], _builder(calls))
    assert calls == ["a", "a"]
    with ckpt.reading() as r:
        assert r.get("a.weight_packed").tolist() == list(range(8))


def test_a_missing_digest_is_a_rebuild(tmp_path):
    from quant_layers.kernel_twins import digest_path

    path, calls = tmp_path / "k.safetensors", []
    ensure_kernel_twins(path, ["a"], _builder(calls))
    digest_path(path).unlink()
    ensure_kernel_twins(path, ["a"], _builder(calls))
    assert calls == ["a", "a"] and digest_path(path).is_file()
