"""Start-up reads an unchanged model's weights at most once, ever.

`morphserve serve` checks the pack, the engine checks it again, workers open the twin: for
a 70B model every full read is hundreds of GB. Verified results are cached under the
MorphServe cache folder, keyed by the files' stat; any change to a file re-verifies.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import quant_layers.model_info as model_info
import quant_layers.twin as twin
from morphserve.runtime import config as runtime_config
from morphserve.errors import USER_ERRORS
from tests.test_hardening_fakes import make_model, make_pack


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private cache that also remembers files written a moment ago (the fakes are)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MORPHSERVE_CACHE", str(path))
    monkeypatch.setattr(model_info, "RACY_NS", 0)
    return path


@pytest.fixture
def weight_reads(monkeypatch) -> list[str]:
    """Names of the .safetensors files opened for a full read by model_info."""
    reads: list[str] = []

    def counting_open(file, mode="r", *a, **kw):
        if str(file).endswith(".safetensors"):
            reads.append(Path(file).name)
        return open(file, mode, *a, **kw)

    monkeypatch.setattr(model_info, "open", counting_open, raising=False)
    return reads


@pytest.fixture
def twin_opens(monkeypatch) -> list[str]:
    opens: list[str] = []
    real = twin.safe_open

    def counting_safe_open(file, *a, **kw):
        opens.append(Path(file).name)
        return real(file, *a, **kw)

    monkeypatch.setattr(twin, "safe_open", counting_safe_open)
    return opens


def _check(pack: Path, model: Path):
    return runtime_config.check_pack_matches(runtime_config.parse(str(pack)), str(model))


def _bump_mtime(file: Path) -> None:
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_two_start_up_checks_hash_the_model_once(cache, tmp_path, weight_reads):
    model = make_model(tmp_path / "model")
    pack = make_pack(tmp_path / "pack", model)  # hashes once for the manifest
    weight_reads.clear()
    _check(pack, model)
    _check(pack, model)
    assert weight_reads == []  # the manifest's own hash was already cached
    assert list(cache.rglob("*.json")) and not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_a_touched_weight_file_is_hashed_again(cache, tmp_path, weight_reads):
    model = make_model(tmp_path / "model")
    info = model_info.read_model_info(model)
    first = info.weights_sha256()
    assert info.weights_sha256() == first and weight_reads == ["model.safetensors"]
    _bump_mtime(model / "model.safetensors")
    assert model_info.read_model_info(model).weights_sha256() == first
    assert weight_reads == ["model.safetensors"] * 2


def test_changed_weights_with_the_old_size_and_mtime_are_still_caught(cache, tmp_path):
    model = make_model(tmp_path / "model")
    pack = make_pack(tmp_path / "pack", model)
    _check(pack, model)
    file = model / "model.safetensors"
    st = file.stat()
    tensors = load_file(file)
    tensors["model.embed_tokens.weight"][0, 0] = 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file.stat().st_size == st.st_size
    with pytest.raises(USER_ERRORS, match="sha256 mismatch"):
        _check(pack, model)


def test_an_unwritable_cache_costs_time_not_correctness(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MORPHSERVE_CACHE", str(blocker))
    model = make_model(tmp_path / "model")
    info = model_info.read_model_info(model)
    assert info.weights_sha256() == info.weights_sha256() == model_info.hash_files(info.weight_files)


def test_the_twin_shapes_are_checked_once_per_change(cache, tmp_path, twin_opens):
    model = make_model(tmp_path / "model")
    pack = make_pack(tmp_path / "pack", model)
    info = model_info.read_model_info(model)
    twin.open_twin(pack / "quantized", info)
    twin_opens.clear()
    tw = twin.open_twin(pack / "quantized", info)
    assert twin_opens == ["model.safetensors"]  # the index only: one header read per file
    assert len(tw.tensors) == 2 * 7 * 3
    # a twin rewritten in place with a wrong shape is re-checked and refused
    file = pack / "quantized" / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.down_proj"
    tensors[f"{key}.weight_packed"] = tensors[f"{key}.weight_packed"][:, :8].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(USER_ERRORS, match=f"{key} has shape"):
        twin.open_twin(pack / "quantized", info)


def test_files_written_a_moment_ago_are_not_cached(tmp_path, monkeypatch, weight_reads):
    """Two writes within one timestamp tick leave the same stat: such results stay uncached."""
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    info = model_info.read_model_info(make_model(tmp_path / "model"))
    info.weights_sha256()
    info.weights_sha256()
    assert weight_reads == ["model.safetensors"] * 2 and not list((tmp_path / "cache").rglob("*.json"))
