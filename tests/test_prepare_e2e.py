"""`morphserve prepare` end to end on the real SmolLM2 with real llm-compressor GPTQ."""

from __future__ import annotations

import json

import pytest

from morphserve.offline.pack import load_manifest
from quant_layers.model_info import read_model_info

pytestmark = pytest.mark.quant


def test_manifest_describes_the_model_and_the_twin(w4_pack_dir, model_dir):
    m = load_manifest(w4_pack_dir)
    info = read_model_info(model_dir)
    assert m.num_layers == 30 and m.bits == 4
    assert m.group_size == 64  # 576 is not a multiple of 128
    assert m.model_sha256 == info.weights_sha256()
    assert sorted(m.swap_order) == list(range(30))
    for b in m.layer_bytes:
        assert b.fp16 == info.layer_fp_bytes() == 7_077_888
        # int4 + a bf16 scale per 64 weights: about 0.28x of bf16.
        assert 0.25 < b.quantized / b.fp16 < 0.30
    assert (w4_pack_dir / m.quantized_dir / "model.safetensors").is_file()
    assert not list(w4_pack_dir.parent.glob(".*partial*"))


def test_importance_records_every_round(pack_dir):
    """On any CPU: the session pack's base tier is W4A16 or, without its kernel, W8A8."""
    imp = json.loads((pack_dir / "importance.json").read_text())
    m = load_manifest(pack_dir)
    assert imp["order"] == m.swap_order
    assert len(imp["rounds"]) == 30
    for r, rnd in enumerate(imp["rounds"]):
        # every candidate is measured, or skipped with a bound below the chosen layer's LIS
        assert len(rnd["scores"]) + len(rnd["skipped"]) == 30 - r
        assert rnd["chosen"] == m.swap_order[r]
        best = max(rnd["scores"].values(), key=lambda s: s["lis"])
        assert rnd["scores"][str(rnd["chosen"])]["lis"] == best["lis"]
        assert all(bound < best["lis"] for bound in rnd["skipped"].values())
        for p, bound in rnd["skipped"].items():
            assert bound == pytest.approx(0.25 * imp["lts"][p] + 0.25 * imp["lrs"][p] + 0.5, abs=1e-6)
        for s in rnd["scores"].values():
            assert s["lis"] == pytest.approx(0.25 * s["lts"] + 0.25 * s["lrs"] + 0.5 * s["mds"])
    # the bound spares most of the forwards on this model
    assert sum(len(rnd["scores"]) for rnd in imp["rounds"]) < 465 / 2
    # MDS is recomputed against the growing set: a layer measured in two rounds scores differently.
    seen: dict[str, float] = {}
    changed = False
    for rnd in imp["rounds"]:
        for p, s in rnd["scores"].items():
            changed |= p in seen and seen[p] != s["mds"]
            seen[p] = s["mds"]
    assert changed


def test_quality_curve_covers_every_level_and_the_baseline_orders(w4_pack_dir):
    q = json.loads((w4_pack_dir / "quality.json").read_text())
    lis = q["orders"]["lis"]["ppl"]
    assert sorted(map(int, lis)) == list(range(31))
    assert q["tokens"] == 511
    for name in ("front_to_back", "back_to_front"):
        assert sorted(map(int, q["orders"][name]["ppl"])) == [0, 7, 15, 22, 30]
        assert q["orders"][name]["ppl"]["30"] == lis["30"]
    assert lis["30"] > lis["0"] * 1.05  # 4-bit costs this model real quality
    assert 10 < lis["0"] < 40


def test_summary_prints_order_and_curve(w4_pack_dir):
    from morphserve.offline.report import summarize_pack

    text = summarize_pack(w4_pack_dir)
    assert "swap order" in text and "front->back" in text
    assert len([ln for ln in text.splitlines() if ln[:3].strip().isdigit()]) == 31
