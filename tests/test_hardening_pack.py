"""A pack or checkpoint the runtime cannot serve is refused up front, in one line.

The runtime's W4 kernel is symmetric 4-bit (uint4b8, no zero points); an 8-bit or
asymmetric twin would otherwise load and compute wrong numbers.
"""

from __future__ import annotations

import pytest

from morphserve.runtime import config as runtime_config
from morphserve.errors import USER_ERRORS
from morphserve.offline.prepare import PrepareOptions, _check_inputs
from quant_layers.model_info import read_model_info
from quant_layers.twin import open_twin
from tests.conftest import morphserve_cli
from tests.test_hardening_fakes import GROUP_SIZE, isolated_cache, make_manifest, make_model, make_pack, make_twin  # noqa: F401


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "model")


def _refused(pack, model, match: str) -> None:
    with pytest.raises(USER_ERRORS, match=match) as e:
        runtime_config.check_pack_matches(runtime_config.parse(str(pack)), str(model))
    assert "\n" not in str(e.value)


def test_symmetric_w4_pack_is_accepted(model, tmp_path):
    pack = make_pack(tmp_path / "pack", model)
    assert runtime_config.check_pack_matches(runtime_config.parse(str(pack)), str(model)).bits == 4


def test_pack_whose_manifest_says_8_bits_is_refused(model, tmp_path):
    _refused(make_pack(tmp_path / "pack", model, manifest_bits=8), model, "8-bit.*symmetric 4-bit")


def test_pack_with_an_8_bit_twin_is_refused(model, tmp_path):
    _refused(make_pack(tmp_path / "pack", model, manifest_bits=8, bits=8), model, "symmetric 4-bit")


def test_pack_with_an_asymmetric_twin_is_refused(model, tmp_path):
    _refused(make_pack(tmp_path / "pack", model, symmetric=False, zero_points=True), model, "asymmetric")


@pytest.mark.parametrize("twin_kw, manifest_kw, match", [
    ({}, {}, None),
    ({}, {"bits": 8}, "manifest says 8-bit"),
    ({"bits": 8}, {"bits": 8}, "twin is 8-bit"),
    ({"symmetric": False}, {}, "asymmetric"),
    ({"zero_points": True}, {}, "zero points"),
    ({}, {"group_size": 64}, "group size 64.*32"),
])
def test_check_servable(model, tmp_path, twin_kw, manifest_kw, match):
    tw = open_twin(make_twin(tmp_path / "twin", model, **twin_kw), read_model_info(model))
    manifest = make_manifest(model, **manifest_kw)
    if match is None:
        runtime_config.check_servable(manifest, tw)
        return
    with pytest.raises(USER_ERRORS, match=match) as e:
        runtime_config.check_servable(manifest, tw)
    assert "\n" not in str(e.value)


def test_prepare_refuses_8_bits_before_any_work(tmp_path):
    # the model does not even exist: the bits refusal must come first
    opt = PrepareOptions(model=tmp_path / "nope", out=tmp_path / "pack", bits=8)
    with pytest.raises(USER_ERRORS, match="--bits 8.*symmetric 4-bit"):
        _check_inputs(opt)


def test_prepare_cli_refuses_8_bits_in_one_line(tmp_path):
    out = tmp_path / "pack"
    proc = morphserve_cli("prepare", str(tmp_path / "nope"), "--out", str(out), "--bits", "8")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --bits 8") and "symmetric 4-bit" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("twin_kw, match", [
    ({"symmetric": False, "zero_points": True}, "asymmetric"),
    ({"bits": 8}, "twin is 8-bit"),
])
def test_prepare_refuses_an_unservable_quantized_checkpoint(model, tmp_path, twin_kw, match):
    ckpt = make_twin(tmp_path / "ckpt", model, **twin_kw)
    opt = PrepareOptions(model=model, out=tmp_path / "pack", quantized=ckpt, group_size=GROUP_SIZE)
    with pytest.raises(USER_ERRORS, match=match):
        _check_inputs(opt)


def test_a_tiered_pack_is_accepted_and_each_tier_is_checked(model, tmp_path):
    from tests.test_hardening_fakes import make_tiered_pack

    pack = make_tiered_pack(tmp_path / "ok", model)
    assert runtime_config.check_pack_matches(runtime_config.parse(str(pack)), str(model)).tier_names == [
        "w8a8", "w4a16"]
    _refused(make_tiered_pack(tmp_path / "static", model, dynamic=False), model, "per-token")
    _refused(make_tiered_pack(tmp_path / "tensor", model, strategy="tensor"), model, "per-channel")
    _refused(make_tiered_pack(tmp_path / "shape", model, bad_shape=True), model, "does not match the model")


def test_a_tiered_pack_with_a_corrupt_or_missing_w8_file_is_refused(model, tmp_path):
    from tests.test_hardening_fakes import make_tiered_pack

    pack = make_tiered_pack(tmp_path / "corrupt", model)
    (pack / "quantized-w8a8" / "model.safetensors").write_bytes(b"\x00" * 64)
    _refused(pack, model, "corrupt safetensors")
    gone = make_tiered_pack(tmp_path / "gone", model)
    import shutil

    shutil.rmtree(gone / "quantized-w8a8")
    _refused(gone, model, "does not exist")


def test_prepare_refuses_unknown_tiers_in_one_line(tmp_path):
    proc = morphserve_cli("prepare", str(tmp_path), "--out", str(tmp_path / "p"), "--tiers", "w8a8,w2")
    assert proc.returncode == 2 and "known tiers: w8a8, w4a16" in proc.stderr
    assert proc.stderr.strip().count("\n") <= 1  # one error line (after vLLM's own import notice, if any)
