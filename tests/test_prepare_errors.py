"""Bad input to `prepare`: one clear error line, non-zero exit, nothing partial left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import morphserve_cli


def _fails_cleanly(proc, out: Path, match: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr[-2000:]}"
    assert match in lines[-1], lines[-1]
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.*")), "partial pack left behind"


def _copy_twin(w4_pack_dir: Path, dst: Path) -> Path:
    shutil.copytree(w4_pack_dir / "quantized", dst)
    return dst


def test_missing_model(tmp_path):
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(tmp_path / "nope"), "--out", str(out)), out, "does not exist")


def test_group_size_that_does_not_divide(model_dir, tmp_path):
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(model_dir), "--out", str(out), "--group-size", "128"),
                   out, "does not divide")


@pytest.mark.quant
def test_quantized_checkpoint_of_another_model(model_dir, w4_pack_dir, tmp_path):
    other = _copy_twin(w4_pack_dir, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=960, num_hidden_layers=32, intermediate_size=2560)  # SmolLM2-360M's shape
    (other / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(model_dir), "--out", str(out), "--quantized", str(other)),
                   out, "different model")


@pytest.mark.quant
def test_quantized_checkpoint_with_wrong_tensor_shapes(model_dir, w4_pack_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    other = _copy_twin(w4_pack_dir, tmp_path / "other")
    tensors = load_file(other / "model.safetensors")
    key = "model.layers.3.mlp.down_proj"
    tensors[f"{key}.weight_packed"] = tensors[f"{key}.weight_packed"][:, :96].contiguous()
    tensors[f"{key}.weight_shape"] = torch.tensor([576, 768])
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(model_dir), "--out", str(out), "--quantized", str(other)),
                   out, "model.layers.3.mlp.down_proj has shape (576, 768)")


@pytest.mark.quant
def test_corrupt_quantized_safetensors(model_dir, w4_pack_dir, tmp_path):
    other = _copy_twin(w4_pack_dir, tmp_path / "other")
    f = other / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated download
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(model_dir), "--out", str(out), "--quantized", str(other)),
                   out, "corrupt safetensors file")


def test_corrupt_model_safetensors(model_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # garbage header
    out = tmp_path / "pack"
    _fails_cleanly(morphserve_cli("prepare", str(broken), "--out", str(out)), out, "corrupt safetensors file")


def test_existing_pack_is_not_overwritten(model_dir, tmp_path):
    out = tmp_path / "pack"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = morphserve_cli("prepare", str(model_dir), "--out", str(out))
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_failed_quantization_leaves_nothing(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHSERVE_QUANT_PYTHON", "/bin/false")  # the quantizer dies immediately
    out = tmp_path / "pack"
    proc = morphserve_cli("prepare", str(model_dir), "--out", str(out))
    assert proc.returncode == 2
    assert "llm-compressor GPTQ failed" in proc.stderr.splitlines()[-1]
    assert not out.exists()
    assert not list(tmp_path.glob(".pack.*")), "partial pack left behind"
