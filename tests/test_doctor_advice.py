"""`morphserve doctor`'s advice from readings: pure logic, no vLLM."""

from __future__ import annotations

from dataclasses import replace

from morphserve.doctor.advice import KvCost, Machine, Pack, Speed, advise
from morphserve.doctor.render import render

AVX512 = Machine(
    cpu_model="test CPU", isa="AVX-512+BF16",
    features={"amx": False, "avx512f": True, "avx512_vnni": True, "avx512_bf16": True, "avx2": True},
    cores=2, memory_gib=24, vllm_version="0.32.0", supported_vllm="0.32.0", patch_problem=None,
    kernels={"bf16": "oneDNN", "w8a8": "oneDNN int8", "w4a16": "CPUWNA16"},
    tier_problems={"w8a8": None, "w4a16": None}, fp8_kv_problem=None,
    tcmalloc="/usr/lib/libtcmalloc_minimal.so.4", quant_env=True, cpu_binding_set=True)
AVX2 = replace(AVX512, isa="AVX2", features={"avx2": True},
               tier_problems={"w8a8": None, "w4a16": "no cpu_gemm_wna16"},
               fp8_kv_problem="FP8 KV cache on CPU requires x86 with AVX-512 or AMX.")
TIERED = Pack("p", "m", ["w8a8", "w4a16"], None)


def speed(w8: tuple[float, float], w4: tuple[float, float]) -> Speed:
    """Relative speeds (x bf16) at batch 1 and 32 as seconds (bf16 = 1 s)."""
    return Speed({"bf16": {1: 1.0, 32: 1.0}, "w8a8": {1: 1 / w8[0], 32: 1 / w8[1]},
                  "w4a16": {1: 1 / w4[0], 32: 1 / w4[1]}}, "test")


def test_a_ready_machine_and_pack_exit_0_with_every_tier():
    a = advise(AVX512, TIERED, speed((1.0, 1.0), (0.9, 0.8)))
    assert a.exit_status == 0 and a.tiers == ["w8a8", "w4a16"] and not a.problems
    assert "ready to serve" in render(AVX512, TIERED, speed((1.0, 1.0), (0.9, 0.8)), a)


def test_avx2_drops_w4a16_and_a_w4a16_only_pack_is_a_problem_with_its_fix():
    a = advise(AVX2, TIERED, None)
    assert a.tiers == ["w8a8"] and a.exit_status == 0
    assert any("w4a16 is out: no cpu_gemm_wna16" in r for r in a.reasons)
    assert any("FP8 KV" in p.what and not p.blocks_serving for p in a.problems)
    assert any("emulates bf16" in p.what and "--dtype float32" in p.fix for p in a.problems)  # prepare and serving
    w4_only = advise(AVX2, Pack("p", "m", ["w4a16"], None), None)
    assert w4_only.exit_status == 1 and w4_only.tiers == []
    assert any("--tiers w8a8" in p.fix for p in w4_only.problems)


def test_a_tier_slow_at_batch_32_is_dropped_while_another_remains():
    a = advise(AVX512, TIERED, speed((1.2, 1.5), (0.9, 0.4)))
    assert a.tiers == ["w8a8"]
    assert any("w4a16 is dropped" in r and "0.40x" in r for r in a.reasons)
    alone = advise(AVX512, Pack("p", "m", ["w4a16"], None), speed((1.2, 1.5), (0.9, 0.4)))
    assert alone.tiers == ["w4a16"]  # the only tier is kept: slow beats nothing to swap


def test_a_tier_faster_than_bf16_everywhere_is_named_against_resting_at_bf16():
    a = advise(AVX512, TIERED, speed((1.3, 2.0), (1.0, 0.9)))
    assert "w8a8's linears are faster than bf16's" in a.reasons[-1] and "static W8A8" in a.reasons[-1]
    assert "no tier is faster" in advise(AVX512, TIERED, speed((1.0, 1.5), (1.0, 0.9))).reasons[-1]


def test_wrong_vllm_mismatched_pack_and_no_tier_block_serving():
    assert advise(replace(AVX512, vllm_version="0.33.0"), None, None).exit_status == 1
    assert advise(replace(AVX512, patch_problem="X.y not found"), None, None).exit_status == 1
    bad = advise(AVX512, Pack("p", "m", ["w4a16"], "pack p does not match the served model m"), None)
    assert bad.exit_status == 1 and "morphserve prepare m --out p" in bad.problems[0].fix
    none = advise(replace(AVX512, tier_problems={"w8a8": "x", "w4a16": "y"}), None, None)
    assert none.exit_status == 1 and none.tiers == []


def test_notes_do_not_block_and_without_a_pack_the_prepare_command_is_given():
    m = replace(AVX512, tcmalloc=None, quant_env=False)
    a = advise(m, None, None)
    assert a.exit_status == 0 and len(a.problems) == 1 and not any(p.blocks_serving for p in a.problems)
    assert a.prepare == "morphserve prepare MODEL_DIR --out PACK_DIR --tiers w8a8,w4a16"
    assert "tcmalloc   not installed (optional)" in render(m, None, None, a)


def test_busy_timings_are_flagged():
    s = replace(speed((1.0, 1.0), (1.0, 1.0)), load=1.5)
    a = advise(AVX512, TIERED, s)
    assert a.exit_status == 0 and any("busy" in p.what for p in a.problems)


def test_timings_taken_beside_other_work_are_flagged():
    quiet = advise(AVX512, TIERED, replace(speed((1.0, 1.0), (1.0, 1.0)), others=0.01))
    assert not quiet.problems
    a = advise(AVX512, TIERED, replace(speed((1.0, 1.0), (1.0, 1.0)), others=0.6))
    assert a.exit_status == 0 and any("0.60 of a core" in p.what and "--remeasure" in p.fix for p in a.problems)


def test_an_fp32_reading_is_named_fp32_and_slower_int8_rungs_buy_memory_not_speed():
    # This AVX2 EPYC's fp32 profile (int8 at 0.36x / 0.40x of fp32's speed at batch 1 / 32):
    # the same tier read against bf16 there looked 2x faster at batch 32.
    fp32 = Speed({"bf16": {1: 1.0, 32: 1.0}, "w8a8": {1: 1 / 0.36, 32: 1 / 0.40}}, "test", dtype="float32")
    a = advise(AVX2, Pack("p", "m", ["w8a8"], None), fp32)
    assert a.tiers == ["w8a8"]  # the only tier is kept
    assert any("0.36x / 0.40x fp32's speed" in r for r in a.reasons)
    assert a.reasons[-1].startswith("fp32 when idle") and "buy KV memory here, not decode speed" in a.reasons[-1]
    screen = render(AVX2, Pack("p", "m", ["w8a8"], None), fp32, a)
    assert "in an fp32 engine (--dtype float32)" in screen and "(0.36x fp32)" in screen
    assert "bf16 " not in screen.split("speed      ")[1].split("\n")[2]  # level 0's row is named fp32
    bf16 = advise(AVX512, TIERED, speed((1.0, 1.5), (1.0, 0.9)))
    assert "x bf16's speed" in " ".join(bf16.reasons) and "buy KV memory" not in bf16.reasons[-1]


def test_where_int8_wins_at_every_batch_the_advice_names_the_idle_rest_option():
    fast = advise(AVX512, TIERED, speed((1.2, 1.5), (0.9, 0.8)))
    assert "`performance` preset rests on all-W8A8" in fast.reasons[-1] and "idle_rest: next_request" in fast.reasons[-1]
    assert "`default` within 5% of its speed" in fast.reasons[-1] and "further_slack: 0.05" in fast.reasons[-1]
    slow = advise(AVX512, TIERED, speed((1.0, 1.5), (1.0, 0.9)))
    assert "idle_rest" not in slow.reasons[-1]


def test_a_tier_that_loses_decodes_but_wins_prompts_says_so():
    # The Zen 3 EPYC's fp32 kernels (scripts/bench_linear_crossover.py): int8 4.7x slower at one
    # token, 0.71x the time at 256 tokens a step.
    zen3 = Speed({"bf16": {1: 1.0, 32: 1.0, 256: 1.0}, "w8a8": {1: 4.66, 32: 1.83, 256: 0.71}}, "test",
                 dtype="float32")
    a = advise(AVX2, Pack("p", "m", ["w8a8"], None), zen3)
    assert "buy KV memory here, not decode speed" in a.reasons[-1]
    assert "at 256 tokens a step (a prompt) w8a8's are 1.41x fp32's speed" in a.reasons[-1]
    assert "static W8A8 checkpoint gives earlier first tokens" in a.reasons[-1]
    assert "--prompt-twin-layers auto` (every layer's twin, on this profile) gives prompts W8A8's speed and " \
        "decodes fp32's" in a.reasons[-1]
    screen = render(AVX2, Pack("p", "m", ["w8a8"], None), zen3, a)
    assert "batch 256" in screen and "(1.41x fp32)" in screen
    # int8 slower at prompts too: no such clause
    slow = Speed({"bf16": {1: 1.0, 32: 1.0, 256: 1.0}, "w8a8": {1: 4.66, 32: 1.83, 256: 1.2}}, "test", dtype="float32")
    assert "first tokens" not in advise(AVX2, Pack("p", "m", ["w8a8"], None), slow).reasons[-1]
    # a reading without the prompt size (cached before it was timed) shows the decode sizes only
    old = Speed({"bf16": {1: 1.0, 32: 1.0}, "w8a8": {1: 4.66, 32: 1.83}}, "test", dtype="float32")
    old_advice = advise(AVX2, Pack("p", "m", ["w8a8"], None), old)
    assert "first tokens" not in old_advice.reasons[-1]
    assert "batch 256" not in render(AVX2, Pack("p", "m", ["w8a8"], None), old, old_advice)


def test_auto_times_the_dtype_the_doctor_recommends_serving_in():
    from morphserve.doctor.facts import serving_dtype

    assert serving_dtype(AVX2, "auto") == "float32"  # bf16 emulated: fp32 is recommended, so timed
    assert serving_dtype(AVX512, "auto") == "bfloat16"
    amx = replace(AVX512, features={"amx": True, "avx512f": True, "avx2": True})
    assert serving_dtype(amx, "auto") == "bfloat16"
    assert serving_dtype(AVX2, "bfloat16") == "bfloat16" and serving_dtype(AVX512, "float32") == "float32"


def test_the_screen_says_whether_serve_can_ask_for_huge_pages():
    a = advise(AVX512, None, None)
    assert ("huge pages kernel THP mode madvise: morphserve serve asks for them (--huge-pages auto)"
            in render(replace(AVX512, thp_mode="madvise"), None, None, a))
    assert "huge pages kernel THP mode never: none to ask for" in render(replace(AVX512, thp_mode="never"), None, None, a)
    assert "huge pages kernel THP mode unknown: none to ask for" in render(AVX512, None, None, a)


def test_a_machine_of_few_cpus_is_told_that_vllms_binding_keeps_one_from_the_model():
    few = replace(AVX512, cpu_binding_set=False)
    [note] = [p for p in advise(few, TIERED, None).problems if "binding" in p.what]
    assert not note.blocks_serving and "computes on 1" in note.what and "--compute-cpus all" in note.fix
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU=0" in note.fix
    assert "binding" in render(few, TIERED, None, advise(few, TIERED, None))
    for quiet in (replace(few, cores=16), replace(few, cores=1), AVX512):  # many CPUs, one, or the operator chose
        assert not [p for p in advise(quiet, TIERED, None).problems if "binding" in p.what]


def fp8_cost(factor0: float, factor30: float, w8a8: float = 1.028) -> KvCost:
    """A W8A8-only ladder of 30 rungs: weights cost rising linearly to `w8a8` at all-W8A8,
    the cache's factor log-linear between its two ends (as `pack kv-cost` interpolates)."""
    ppl = {k: 20.0 * (1 + (w8a8 - 1) * k / 30) for k in range(31)}
    factor = {k: factor0 ** (1 - k / 30) * factor30 ** (k / 30) for k in range(31)}
    return KvCost(factor, ppl, all_w8a8=30)


def test_the_fp8_cache_is_weighed_against_static_w8a8_only_where_it_runs_and_the_ladder_has_w8a8():
    w8 = Pack("p", "m", ["w8a8"], None)
    fast = speed((1.2, 1.5), (0.9, 0.8))
    # measured: the Zen 5's figures (+2.6% at full precision, +2.0% on all-W8A8's)
    zen5 = advise(AVX512, w8, fast, fp8_cost(1.026, 1.020))
    [reason] = [r for r in zen5.reasons if r.startswith("FP8 KV runs here")]
    assert "+2.60% perplexity on full-precision weights and +4.86% on all-W8A8, against static W8A8's +2.80%" in reason
    assert "within static W8A8's own +2.80% an FP8 cache allows levels 0-2 of this ladder's 30 W8A8 rungs" in reason
    assert "a static W8A8 checkpoint with `--kv-cache-dtype fp8` served it best" in reason
    assert zen5.reasons[-1].startswith("bf16 when idle")  # the recommend line's reason stays last
    # a cheap cache leaves room to climb; one just under static W8A8's cost, full precision only; a dear one, none
    cheap = [r for r in advise(AVX512, w8, fast, fp8_cost(1.005, 1.005)).reasons if r.startswith("FP8 KV")][0]
    assert "allows levels 0-24 of this ladder's 30 W8A8 rungs" in cheap
    edge = [r for r in advise(AVX512, w8, fast, fp8_cost(1.0279, 1.0279)).reasons if r.startswith("FP8 KV")][0]
    assert "allows full precision only" in edge
    dear = [r for r in advise(AVX512, w8, fast, fp8_cost(1.074, 1.074)).reasons if r.startswith("FP8 KV")][0]
    assert "allows no level of this ladder, not even full precision" in dear
    # not measured: the command that measures it
    unmeasured = [r for r in advise(AVX512, w8, fast).reasons if r.startswith("FP8 KV")][0]
    assert "`morphserve pack kv-cost p` measures" in unmeasured
    # no FP8 attention here, no W8A8 on the ladder, or a pack that does not serve: nothing said
    assert not [r for r in advise(AVX2, w8, fast).reasons if "FP8" in r]
    assert not [r for r in advise(AVX512, Pack("p", "m", ["w4a16"], None), fast).reasons if "FP8 KV runs" in r]
    assert not [r for r in advise(AVX512, Pack("p", "m", ["w8a8"], "bad"), fast).reasons if "FP8 KV runs" in r]


def test_kv_cost_charges_as_the_evaluation_does():
    cost = fp8_cost(1.026, 1.020)
    assert abs(cost.increase(0) - 0.026) < 1e-9 and abs(cost.increase(30, fp8=False) - 0.028) < 1e-9
    assert abs(cost.increase(30) - (1.028 * 1.020 - 1)) < 1e-9
    assert cost.highest_within(0.028) == 2 and cost.highest_within(0.01) is None and cost.highest_within(1.0) == 30
