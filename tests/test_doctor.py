"""`morphserve doctor` on this machine with the session's real pack, and with broken inputs.

In-process (vLLM's kernels are imported, no engine starts): the kernel timings take seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from morphserve.cli.commands import main
from tests.conftest import tier_verdicts

pytestmark = pytest.mark.quant  # the session pack is built with llm-compressor


def doctor(capsys, *args: str) -> tuple[int, dict]:
    code = main(["doctor", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MORPHSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# The kernel speed the first test measured, for the text screen's test: timing the kernels
# again there only repeated this module's slowest part (about 40 s of one core on a 2-vCPU
# AVX2 EPYC, where a busy machine's timing is not cached); the screen is what it tests.
_MEASURED: list = []


def test_the_real_pack_is_ready_here_and_its_kernels_are_timed_then_cached(pack_dir, model_dir, own_cache, capsys,
                                                                          monkeypatch):
    from morphserve.doctor import facts

    real = facts.speed
    monkeypatch.setattr(facts, "speed", lambda *a, **k: _MEASURED.append(real(*a, **k)) or _MEASURED[-1])
    code, out = doctor(capsys, "--pack", str(pack_dir), "--model", str(model_dir))
    m, advice, speed = out["machine"], out["advice"], out["speed"]
    assert code == 0 and advice["exit_status"] == 0, advice["problems"]
    assert m["vllm_version"] == "0.32.0" and m["patch_problem"] is None
    assert m["tier_problems"] == tier_verdicts()  # what `serve` probes, not a second opinion
    assert set(m["kernels"]) == {"bf16", "w8a8", "w4a16"} and all(m["kernels"].values())
    assert out["pack"]["problem"] is None and out["pack"]["tiers"]
    assert set(advice["tiers"]) <= set(out["pack"]["tiers"]) and advice["tiers"]
    timed = speed["seconds"]
    # timed in the dtype the doctor recommends serving in here: fp32 where bf16 is emulated
    bf16_native = m["features"].get("avx512_bf16") or m["features"].get("amx")
    assert speed["dtype"] == ("bfloat16" if bf16_native else "float32")
    assert set(timed) == {"bf16"} | {t for t in out["pack"]["tiers"] if tier_verdicts()[t] is None}
    assert all(0 < s < 1 for by_batch in timed.values() for s in by_batch.values())
    if speed["load"] < m["cores"] * 0.5:  # an idle machine's timing is cached; a second run reads it
        code, again = doctor(capsys, "--pack", str(pack_dir), "--model", str(model_dir))
        assert code == 0 and again["speed"]["source"].startswith("cached:")
        assert again["speed"]["seconds"] == timed
        # the cached reading says how many layer copies each tier streamed: past the cache, or the whole model
        import torch

        from morphserve.vllm.kernel_speed import STREAM_FACTOR, weight_bytes
        from quant_layers.model_info import read_model_info

        [cached] = (own_cache / "doctor").glob("kernel-speed-*.json")
        reading = json.loads(cached.read_text())
        info = read_model_info(model_dir)
        weights = sum(n * k for n, k in info.linear_shapes.values())  # one layer's linears
        for tier, copies in reading["copies"].items():
            streamed = copies * weight_bytes(tier, getattr(torch, speed["dtype"])) * weights  # fp32 rung: 4 bytes
            assert streamed >= STREAM_FACTOR * reading["cache_bytes"] or copies == info.num_layers, (tier, copies)


def test_the_text_screen_names_the_isa_the_recommendation_and_the_verdict(pack_dir, own_cache, capsys, monkeypatch):
    from morphserve.doctor import facts
    from quant_layers.cpu_kind import this_cpu

    if _MEASURED:  # measured by the test above (run alone, this test measures)
        monkeypatch.setattr(facts, "speed", lambda *a, **k: _MEASURED[0])
    assert main(["doctor", "--pack", str(pack_dir)]) == 0
    text = capsys.readouterr().out
    assert this_cpu().isa in text and "AVX512_BF16" in text and "recommend  --tiers" in text
    assert text.rstrip().endswith("ready to serve")


def test_an_fp8_cache_measured_for_the_pack_is_weighed_against_static_w8a8(pack_dir, model_dir, own_cache, capsys,
                                                                          monkeypatch):
    from morphserve.doctor import facts
    from morphserve.offline import kv_cost
    from morphserve.offline import pack as packfmt
    from morphserve.offline.ladder import Ladder

    if _MEASURED:
        monkeypatch.setattr(facts, "speed", lambda *a, **k: _MEASURED[0])
    code, out = doctor(capsys, "--pack", str(pack_dir), "--model", str(model_dir))
    said = [r for r in out["advice"]["reasons"] if r.startswith("FP8 KV runs here")]
    if out["machine"]["fp8_kv_problem"] is not None or "w8a8" not in out["advice"]["tiers"]:
        assert not said  # nothing to weigh: no FP8 attention here (AVX2), or no W8A8 rival
        return
    assert len(said) == 1 and f"`morphserve pack kv-cost {pack_dir}` measures" in said[0]
    # what `pack kv-cost` keeps (here in this test's own cache folder), read as serve reads it
    served = [t for t, problem in tier_verdicts().items() if problem is None and t in out["pack"]["tiers"]]
    top = Ladder.from_manifest(packfmt.load_manifest(pack_dir), served).top
    kv_cost.save(pack_dir, "fp8", served, {"top": top, "factor": {"0": 1.026, str(top): 1.03}})
    code, out = doctor(capsys, "--pack", str(pack_dir), "--model", str(model_dir))
    [reason] = [r for r in out["advice"]["reasons"] if r.startswith("FP8 KV runs here")]
    assert code == 0 and "+2.60% perplexity on full-precision weights" in reason and "against static W8A8's +" in reason


def test_a_pack_missing_a_file_is_a_problem_with_its_fix(pack_dir, model_dir, tmp_path, own_cache, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(pack_dir, broken, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    victim = next(p for p in sorted(broken.rglob("*.safetensors")))
    victim.unlink()
    code, out = doctor(capsys, "--pack", str(broken), "--model", str(model_dir))
    assert code == 1 and out["pack"]["problem"] and out["speed"] is None
    # the pack's problem blocks serving; a machine's notes (no native bf16, no FP8 KV) may come first and do not
    [problem] = [p for p in out["advice"]["problems"] if p["blocks_serving"]]
    assert problem["what"] == out["pack"]["problem"] and "morphserve prepare" in problem["fix"]


def test_a_pack_for_another_model_is_a_problem(pack_dir, model_dir, tmp_path, own_cache, capsys):
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (other / "config.json").write_text(json.dumps(config))
    for f in model_dir.glob("*.safetensors"):
        (other / f.name).symlink_to(f)
    code, out = doctor(capsys, "--pack", str(pack_dir), "--model", str(other))
    assert code == 1 and "does not match" in out["pack"]["problem"]


def test_no_pack_at_all_and_a_bad_model_folder(tmp_path, own_cache, capsys):
    code, out = doctor(capsys, "--pack", str(tmp_path / "nowhere"))
    assert code == 1 and out["pack"]["problem"]
    assert main(["doctor", "--model", str(tmp_path)]) == 2  # not a model folder: one error line
    assert "error: --model" in capsys.readouterr().err
