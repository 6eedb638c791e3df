"""Tiers come from what this CPU runs: the pure choice of served tiers, ladders over a
subset, W8A8-only packs, the proof call before an install, and the CPU-kind reading.
Pure logic and fakes: milliseconds, no engine."""

from __future__ import annotations

import json

import pytest
import torch

from morphserve.errors import MorphServeError
from morphserve.offline import pack as packfmt
from morphserve.offline.ladder import Ladder, served_quality
from policies.config import dearer_fill
from morphserve.runtime.config import serve_tiers
from quant_layers.cpu_kind import parse_cpuinfo
from quant_layers.swappable import ProofFailed, prove_compute
from tests.test_ladder import manifest

NO_W4 = "this CPU (AVX2) has no AVX-512, and vLLM's AVX2 build has no W4A16 kernel (cpu_gemm_wna16)"


def probe(**missing):
    return lambda tiers: {t: missing.get(t) for t in tiers}


def w8_only_manifest() -> packfmt.Manifest:
    return packfmt.Manifest(tool_version="t", model_path="/m", model_sha256="x", architecture="LlamaForCausalLM",
                            num_layers=3, bits=8, group_size=0, base_tier="w8a8",
                            format=packfmt.TIER_FORMATS["w8a8"], quantized_dir="quantized-w8a8",
                            quantization_source="test", swap_order=[1, 0, 2],
                            layer_bytes=[packfmt.LayerBytes(layer=i, fp16=100, quantized=50) for i in range(3)])


# -- which tiers are served -------------------------------------------------------------------
def test_every_tier_is_served_where_every_kernel_runs():
    assert serve_tiers(manifest(True), None, probe()) == ["w8a8", "w4a16"]
    assert serve_tiers(manifest(False), None, probe()) == ["w4a16"]


def test_a_tiered_pack_drops_its_w4a16_tier_with_one_warning(caplog):
    assert serve_tiers(manifest(True), None, probe(w4a16=NO_W4)) == ["w8a8"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "without its w4a16 tier" in warnings[0] and "AVX-512" in warnings[0]


def test_a_w4a16_only_pack_is_refused_in_one_line_naming_the_missing_feature():
    with pytest.raises(MorphServeError) as e:
        serve_tiers(manifest(False), None, probe(w4a16=NO_W4))
    msg = str(e.value)
    assert "\n" not in msg and "AVX-512" in msg and "--tiers w8a8" in msg


def test_asking_for_a_tier_the_pack_lacks_is_refused():
    with pytest.raises(MorphServeError, match="has no w8a8 tier"):
        serve_tiers(manifest(False), ["w8a8"], probe())
    assert serve_tiers(manifest(True), ["w8a8"], probe()) == ["w8a8"]


# -- W8A8-only packs and ladders over a subset ----------------------------------------------------
def test_a_w8a8_only_pack_is_a_valid_pack_whose_ladder_is_bf16_to_w8a8():
    m = w8_only_manifest()
    assert m.tier_names == ["w8a8"] and m.tier("w8a8").swap_order == [1, 0, 2] and m.tier("w4a16") is None
    ladder = Ladder.from_manifest(m)
    assert [(r.layer, r.tier) for r in ladder.rungs] == [(1, "w8a8"), (0, "w8a8"), (2, "w8a8")]
    assert ladder.savings == [50, 50, 50] and not ladder.tiered
    assert packfmt.tier_dirs(packfmt.Path("/p"), m) == {"w8a8": packfmt.Path("/p/quantized-w8a8")}


def test_a_w8a8_only_manifest_must_say_so_consistently():
    raw = w8_only_manifest().model_dump()
    with pytest.raises(ValueError, match="stored as"):
        packfmt.Manifest.model_validate({**raw, "format": packfmt.FORMAT})
    with pytest.raises(ValueError, match="no further tiers"):
        packfmt.Manifest.model_validate({**raw, "tiers": [manifest(True).tiers[0].model_dump()]})


def test_a_tiered_pack_served_without_w4a16_climbs_its_w8a8_rungs_only():
    ladder = Ladder.from_manifest(manifest(True), ["w8a8"])
    assert [(r.layer, r.tier) for r in ladder.rungs] == [(1, "w8a8"), (2, "w8a8"), (0, "w8a8")]
    assert ladder.savings == [50, 50, 50] and ladder.tier_names == ["w8a8"]
    w4_only = Ladder.from_manifest(manifest(True), ["w4a16"])  # bf16 -> W4A16 frees both rungs' bytes
    assert w4_only.savings == [70, 70, 70]


def test_the_served_ladder_gets_the_quality_curve_of_its_own_rungs():
    quality = {"fp16_ppl": 10.0, "orders": {"lis": {"ppl": {"0": 10.0, "3": 14.0}}},
               "tiers": {"w8a8": {"ppl": {"0": 10.0, "1": 10.1, "2": 10.2, "3": 10.3}}},
               "ladder": {"ppl": {str(k): 10.0 + k for k in range(7)}}}
    assert served_quality(quality, ["w8a8", "w4a16"], ["w8a8", "w4a16"]) is quality
    w8 = served_quality(quality, ["w8a8", "w4a16"], ["w8a8"])
    assert "ladder" not in w8 and w8["orders"]["lis"]["ppl"] == {"0": 10.0, "1": 10.1, "2": 10.2, "3": 10.3}
    # a tiered pack measures its W4A16-only curve sparsely: served alone, the gaps take the dearer side
    assert served_quality(quality, ["w8a8", "w4a16"], ["w4a16"])["orders"]["lis"]["ppl"] == {
        "0": 10.0, "1": 14.0, "2": 14.0, "3": 14.0}


def test_a_sparse_curve_is_filled_from_the_level_above():
    assert dearer_fill({"0": 20.0, "2": 21.0, "5": 24.0}) == {
        0: 20.0, 1: 21.0, 2: 21.0, 3: 24.0, 4: 24.0, 5: 24.0}
    dense = {k: 20.0 + k for k in range(4)}
    assert dearer_fill(dense) == dense


# -- the proof call ----------------------------------------------------------------------------
def test_a_compute_that_runs_passes_its_proof():
    w = torch.randn(8, 16)
    prove_compute(lambda x, _w, _b: x.float() @ w.t(), 16, 8, torch.float32)


@pytest.mark.parametrize("compute, what", [
    (lambda x, _w, _b: torch.zeros(1, 7), "shape"),
    (lambda x, _w, _b: torch.full((1, 8), float("nan")), "non-finite"),
    (lambda x, _w, _b: (_ for _ in ()).throw(AttributeError("'_OpNamespace' '_C' object has no attribute 'x'")),
     "AttributeError"),
])
def test_a_compute_that_would_break_the_engine_fails_its_proof(compute, what):
    with pytest.raises(ProofFailed, match=what):
        prove_compute(compute, 16, 8, torch.float32)


def test_the_fault_point_fails_the_proof():
    def fault(point):
        raise RuntimeError(f"injected fault at {point}")

    with pytest.raises(ProofFailed, match="injected fault at proof"):
        prove_compute(lambda x, _w, _b: torch.zeros(1, 8), 16, 8, torch.float32, fault)


# -- the CPU kind ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, isa, bf16", [
    ("fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16", "AMX", True),
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", "AVX-512+BF16", True),
    ("fpu avx2 avx512f avx512_vnni", "AVX-512", False),
    ("fpu avx avx2 fma", "AVX2", False),
])
def test_cpu_kinds_are_named_from_their_flags(flags, isa, bf16):
    kind = parse_cpuinfo(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert (kind.isa, kind.native_bf16, kind.model) == (isa, bf16, "Some CPU")


def test_prepare_picks_the_offline_dtype_this_cpu_runs_faster(monkeypatch):
    from morphserve.offline import prepare

    def never(dtype):
        raise AssertionError("no measurement where bf16 is emulated")

    monkeypatch.setattr(prepare, "this_cpu", lambda: parse_cpuinfo("flags\t: avx2\n"))
    assert prepare.compute_dtype("auto", never) == torch.float32
    monkeypatch.setattr(prepare, "this_cpu", lambda: parse_cpuinfo("flags\t: avx2 avx512f avx512_bf16\n"))
    timings = {torch.bfloat16: 1.0, torch.float32: 0.7}
    assert prepare.compute_dtype("auto", timings.get) == torch.float32  # fp32 clearly faster
    timings[torch.float32] = 0.95
    assert prepare.compute_dtype("auto", timings.get) == torch.bfloat16  # a near tie: the serving dtype
    assert prepare.compute_dtype("fp32", never) == torch.float32 and prepare.compute_dtype("bf16", never) == torch.bfloat16
    assert prepare.matmul_seconds(torch.float32, m=8, k=8, n=8) > 0


def test_calibration_runs_in_fp32_only_where_bf16_is_emulated_or_asked_for(monkeypatch):
    from morphserve.offline import prepare

    monkeypatch.setattr(prepare, "this_cpu", lambda: parse_cpuinfo("flags\t: avx2\n"))
    assert prepare.calibration_dtype("auto") == "fp32" and prepare.calibration_dtype("bf16") == "bf16"
    monkeypatch.setattr(prepare, "this_cpu", lambda: parse_cpuinfo("flags\t: avx2 avx512f avx512_bf16\n"))
    assert prepare.calibration_dtype("auto") == "bf16" and prepare.calibration_dtype("fp32") == "fp32"


def test_an_fp32_calibrated_checkpoint_is_written_as_a_bf16_one(tmp_path):
    """Integers exactly as fp32 chose them; floats cast to bf16; metadata and dtype kept
    consistent, so vLLM and the pack readers see the same kind of checkpoint as before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from quant_layers.gptq_job import store_floats_as_bf16

    q = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    packed = torch.randint(-2**31, 2**31 - 1, (4, 1), dtype=torch.int32)
    scale, norm = torch.rand(4, 1) + 1e-3, torch.rand(8)
    save_file({"w.weight": q, "w.weight_packed": packed, "w.weight_scale": scale, "n.weight": norm},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32", "dtype": "float32", "x": 1}))
    assert store_floats_as_bf16(str(tmp_path)) == 2
    out = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(out["w.weight"], q) and torch.equal(out["w.weight_packed"], packed)
    assert out["w.weight_scale"].dtype == out["n.weight"].dtype == torch.bfloat16
    assert torch.equal(out["w.weight_scale"], scale.to(torch.bfloat16)) and torch.equal(out["n.weight"], norm.to(torch.bfloat16))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "config.json").read_text()) == {"torch_dtype": "bfloat16", "dtype": "bfloat16", "x": 1}
    assert store_floats_as_bf16(str(tmp_path)) == 0  # idempotent


def test_prepare_auto_tiers_follow_the_probe_and_the_measured_speed(tmp_path):
    """`auto` builds the ladder the doctor recommends: what runs here, less a tier measured too
    slow to be a rung (never the last one); checkpoints given narrow it to their tiers."""
    from morphserve.doctor.advice import Speed
    from morphserve.offline.prepare import PrepareOptions, _resolve_tiers

    def timed(w4a16_at_32: float):  # seconds of one layer's linears; bf16 = 1.0
        return lambda info, tiers, group_size: Speed(
            {"bf16": {1: 1.0, 32: 1.0}, "w8a8": {1: 1.1, 32: 0.7}, "w4a16": {1: 2.5, 32: w4a16_at_32}}, "test")

    info = object()
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(w4a16=NO_W4), speed=timed(2.5))
    assert _resolve_tiers(opt, info) == ["w8a8"]  # no W4A16 kernel (AVX2)
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(), speed=timed(1.4))
    assert _resolve_tiers(opt, info) == ["w8a8", "w4a16"]  # 0.71x at batch 32: a rung (the Intel AVX-512 case)
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(), speed=timed(2.5))
    assert _resolve_tiers(opt, info) == ["w8a8"]  # 0.40x: dropped (the AMD EPYC AVX-512 case)
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(), speed=timed(1.4),
                         quantized=tmp_path / "ckpt")
    assert _resolve_tiers(opt, info) == ["w4a16"]  # a twin given: its tier only, no quantization run
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(), speed=timed(2.5),
                         quantized=tmp_path / "ckpt", quantized_w8a8=tmp_path / "ckpt8")
    assert _resolve_tiers(opt, info) == ["w8a8", "w4a16"]  # both given: both used, whatever their speed
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe(w4a16=NO_W4), speed=timed(1.4),
                         quantized=tmp_path / "ckpt", quantized_w8a8=tmp_path / "ckpt8")
    assert _resolve_tiers(opt, info) == ["w8a8"]  # ... as they run here
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", probe=probe())
    assert _resolve_tiers(opt, info) == ["w8a8", "w4a16"]  # nothing measured: every tier that runs
    opt = PrepareOptions(model=tmp_path, out=tmp_path / "p", tiers="w4a16", probe=probe(w4a16=NO_W4))
    with pytest.raises(MorphServeError, match="use --tiers w8a8"):
        _resolve_tiers(opt)
    assert json.dumps(_resolve_tiers(PrepareOptions(model=tmp_path, out=tmp_path, tiers="w8a8,w4a16",
                                                    probe=probe(w4a16=NO_W4)))) == '["w8a8", "w4a16"]'


def test_the_last_level_cache_is_read_from_sysfs(tmp_path):
    from quant_layers.cpu_kind import DEFAULT_LLC_BYTES, last_level_cache_bytes, parse_cache_size

    assert parse_cache_size("32768K\n") == 32 * 2**20 and parse_cache_size("1M") == 2**20
    assert parse_cache_size("512") == 512 and parse_cache_size("lots") is None
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    (tmp_path / "index1").mkdir()  # no size file: skipped
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == DEFAULT_LLC_BYTES


def test_kernel_timings_stream_past_the_cache_but_never_more_than_the_model():
    from morphserve.vllm.kernel_speed import STREAM_FACTOR, layer_copies

    smollm2 = [("qkv_proj", 960, 576), ("o_proj", 576, 576), ("gate_up_proj", 3072, 576), ("down_proj", 576, 1536)]
    llc = 32 * 2**20
    bf16 = layer_copies("bf16", smollm2, 30, llc)  # 7.1 MB a layer
    assert bf16 == 19 and (bf16 - 1) * 2 * 3_538_944 < STREAM_FACTOR * llc <= bf16 * 2 * 3_538_944
    assert layer_copies("w8a8", smollm2, 30, llc) == 30  # 38 would be needed: capped at the model's layers
    assert layer_copies("w4a16", smollm2, 30, 0) == 1  # no cache to beat: one layer
    assert layer_copies("bf16", [("x", 65536, 65536)], 80, llc) == 1  # an 8.6 GB layer streams by itself
    assert layer_copies("bf16", smollm2, 30, llc, torch.float32) == 10  # an fp32 engine's rung: twice the bytes
    assert layer_copies("w8a8", smollm2, 30, llc, torch.float32) == 30  # int8 weights whatever the activations


def test_the_kernel_profile_is_timed_and_cached_in_the_engines_dtype(monkeypatch, tmp_path):
    """An fp32 engine (where bf16 is emulated) must not read a bf16 profile: on an AVX2 EPYC
    bf16's linears take 14.8 ms at 32 tokens against int8's 7.0 and fp32's 3.0 (docs/RESULTS.md,
    "An fp32 server on the AVX2-only EPYC"), so a bf16 reading would have an fp32 server
    quantize for a speed it does not get."""
    from morphserve.runtime import tier_speed
    from morphserve.vllm import kernel_speed

    timed = []

    def fake_time_layer(tier, shapes, batches, group_size, dtype=torch.bfloat16, min_seconds=0.4, copies=1):
        timed.append((tier, dtype, copies))
        return {b: (1.0 if dtype == torch.float32 else 2.0) * b for b in batches}

    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_speed, "time_layer", fake_time_layer)
    monkeypatch.setattr(tier_speed, "busy_cores", lambda *a, **k: 0.0)
    monkeypatch.setattr(tier_speed, "last_level_cache_bytes", lambda: 32 * 2**20)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}  # SmolLM2's
    fp32 = tier_speed.measure(shapes, ["w8a8"], 0, 30, dtype="float32")
    assert {(t, d) for t, d, _ in timed} == {("bf16", torch.float32), ("w8a8", torch.float32)}
    assert dict((t, c) for t, _, c in timed) == {"bf16": 10, "w8a8": 30}
    assert fp32.seconds["bf16"][8] == 8.0 and fp32.source.startswith("measured now")
    timed.clear()
    bf16 = tier_speed.measure(shapes, ["w8a8"], 0, 30)  # the default: the model's bf16
    assert {d for _, d, _ in timed} == {torch.bfloat16} and bf16.seconds["bf16"][8] == 16.0
    timed.clear()
    again = tier_speed.measure(shapes, ["w8a8"], 0, 30, dtype="float32")
    assert not timed and again.source.startswith("cached:") and again.seconds == fp32.seconds
    assert len(list((tmp_path / tier_speed.CACHE_DIR).glob("kernel-speed-*.json"))) == 2


def test_a_kernel_profile_is_not_reused_by_another_generation_of_the_same_cpu(monkeypatch, tmp_path):
    """A Zen 4 and a Zen 5 EPYC both read "AMD EPYC" with the same deciding flags; a work tree
    (its cache with it) moved from one to the other served the first one's speed profile."""
    from morphserve.runtime import tier_speed
    from morphserve.vllm import kernel_speed

    timed = []
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_speed, "time_layer",
                        lambda tier, shapes, batches, *a, **k: timed.append(tier) or {b: 1.0 for b in batches})
    monkeypatch.setattr(tier_speed, "busy_cores", lambda *a, **k: 0.0)
    monkeypatch.setattr(tier_speed, "last_level_cache_bytes", lambda: 32 * 2**20)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    flags = "fpu avx2 avx512f avx512_bf16 avx512_vnni"
    for family, model in (("25", "17"), ("26", "2")):
        cpu = parse_cpuinfo(f"model name\t: AMD EPYC\ncpu family\t: {family}\nmodel\t\t: {model}\nflags\t: {flags}\n")
        monkeypatch.setattr(tier_speed, "this_cpu", lambda cpu=cpu: cpu)
        timed.clear()
        assert tier_speed.measure(shapes, ["w8a8"], 0, 30).source.startswith("measured now")
        assert timed, f"family {family} model {model} reused another CPU's profile"
        assert "family " + family + " model " + model in cpu.describe()
    assert len(list((tmp_path / tier_speed.CACHE_DIR).glob("kernel-speed-*.json"))) == 2


def test_the_cli_gives_prepare_the_probe_and_the_kernel_timing(monkeypatch, tmp_path):
    """`auto` is only as good as its inputs: the CLI must hand prepare both readings."""
    from morphserve.cli import commands
    from morphserve.offline import prepare, report

    seen = {}
    monkeypatch.setattr(prepare, "run_prepare", lambda opt: seen.setdefault("opt", opt))
    monkeypatch.setattr(report, "summarize_pack", lambda out: "")
    assert commands.main(["prepare", str(tmp_path), "--out", str(tmp_path / "p")]) == 0
    opt = seen["opt"]
    assert opt.tiers == "auto" and opt.probe is commands._probe and opt.speed is commands._speed


def test_a_kernel_profile_timed_beside_other_work_is_timed_again_and_cached_only_when_quiet(monkeypatch, tmp_path):
    """A serving worker times its kernels while its own API server starts beside it: on a
    2-vCPU AMX Xeon such a reading put bf16's prompt token at 2.5x the quiet one and was
    cached for every later start. Timed again while others were busy; the quietest kept;
    cached only when quiet."""
    from morphserve.runtime import tier_speed
    from morphserve.vllm import kernel_speed

    others = []  # what each timing found beside it, in order

    def fake_beside(work):
        return work(), others.pop(0)

    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_speed, "time_layer", lambda tier, shapes, batches, *a, **k: {b: 1.0 for b in batches})
    monkeypatch.setattr(tier_speed, "busy_cores", lambda *a, **k: 0.0)
    monkeypatch.setattr(tier_speed, "beside_others", fake_beside)
    monkeypatch.setattr(tier_speed, "last_level_cache_bytes", lambda: 32 * 2**20)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    cache = tmp_path / tier_speed.CACHE_DIR
    others[:] = [0.9, 0.6, 0.4]  # busy every time: the quietest is used, nothing is cached
    busy = tier_speed.measure(shapes, ["w8a8"], 0, 30)
    assert not others and busy.others == 0.4 and "not cached" in busy.source and "0.40 of a core" in busy.source
    assert not list(cache.glob("kernel-speed-*.json"))
    others[:] = [0.17, 0.02, 0.0]  # quiet at the second timing: cached, the third never made
    quiet = tier_speed.measure(shapes, ["w8a8"], 0, 30)
    assert others == [0.0] and quiet.others == 0.02 and "cached at" in quiet.source
    assert tier_speed.measure(shapes, ["w8a8"], 0, 30).source.startswith("cached:")


def test_other_processes_work_is_told_from_this_processs_own(monkeypatch):
    """The timing's own threads are this process's CPU time, not other work: 1.6 s busy on
    this process's CPUs over 1 s, 0.9 s of it its own, is 0.7 of a core of others'."""
    import os
    from types import SimpleNamespace

    from morphserve.runtime import tier_speed

    tick = os.sysconf("SC_CLK_TCK")
    ticks = iter([(10_000, 5_000), (10_000 + 2 * tick, 5_000 + int(0.4 * tick))])  # (all, idle)
    clocks = {"own": iter([3.0, 3.9]), "wall": iter([50.0, 51.0])}
    monkeypatch.setattr(tier_speed, "_cpu_ticks", lambda cpus: next(ticks))
    monkeypatch.setattr(tier_speed, "time", SimpleNamespace(process_time=lambda: next(clocks["own"]),
                                                            monotonic=lambda: next(clocks["wall"])))
    result, others = tier_speed.beside_others(lambda: "timed")
    assert result == "timed" and others == pytest.approx(0.7)
