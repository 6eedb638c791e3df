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


def test_importance_records_every_round(w4_pack_dir):
    imp = json.loads((w4_pack_dir / "importance.json").read_text())
    m = load_manifest(w4_pack_dir)
    assert imp["order"] == m.swap_order
    assert len(imp["rounds"]) == 30
    for r, rnd in enumerate(imp["rounds"]):
        assert len(rnd["scores"]) == 30 - r
        assert rnd["chosen"] == m.swap_order[r]
        best = max(rnd["scores"].values(), key=lambda s: s["lis"])
        assert rnd["scores"][str(rnd["chosen"])]["lis"] == best["lis"]
        for s in rnd["scores"].values():
            assert s["lis"] == pytest.approx(0.25 * s["lts"] + 0.25 * s["lrs"] + 0.5 * s["mds"])
    # MDS is recomputed against the growing set: a layer's score changes between rounds.
    survivor = str(m.swap_order[-1])
    assert imp["rounds"][0]["scores"][survivor]["mds"] != imp["rounds"][20]["scores"][survivor]["mds"]


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
