"""The evaluation's pure logic: suite validation, run order, quality from the record,
medians/ranges/ties, targets and the equal-work check (no server)."""

import json
import math
from pathlib import Path

import pytest

from morphserve.errors import MorphServeError
from morphserve.evaluation import aggregate, quality, render
from morphserve.evaluation.runner import run_order
from morphserve.evaluation.suite import load_suite
from policies.config import load_policy

REPO = Path(__file__).resolve().parent.parent
SUITE = """
name: t
windows:
  - {name: a, trace: azure-conv, start_s: 0, duration_s: 10, rate_scale: 0.5, length_scale: 1, output_scale: 1,
     regime: capacity, why: test}
budgets:
  - {name: small, total_mb: 329}
  - {name: big, kv_gib: 1}
systems:
  - {name: fp16, kind: fp16}
  - {name: fp16-compiled, kind: fp16-compiled, budgets: [small]}
  - {name: w4, kind: w4}
  - {name: ms, kind: morphserve, policy: accuracy}
"""


def _write(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_shipped_suites_are_valid():
    for path in sorted((REPO / "evaluations").glob("*.yaml")):
        suite = load_suite(path)
        assert suite.cells(), path


def test_every_policy_a_shipped_suite_names_loads():
    """A suite is committed before it runs, so a policy file it names that fails to load
    would be found only by the run it was written for."""
    refs = {s.policy for path in (REPO / "evaluations").glob("*.yaml") for s in load_suite(path).systems if s.policy}
    refs |= {str(p.relative_to(REPO)) for p in (REPO / "evaluations" / "policies").glob("*.yaml")}
    assert "evaluations/policies/default-tpot-0.4.yaml" in refs
    for ref in sorted(refs):
        load_policy(str(REPO / ref) if ref.endswith(".yaml") else ref)  # raises PolicyError on a bad file


def test_the_tpot_04_policy_is_the_default_preset_but_its_tpot_slo():
    """The file copies the preset (a policy file cannot extend one), so a later change to the
    preset must show up here rather than leave the AVX2 rows judging a drifted copy."""
    preset, _ = load_policy("default")
    copy, _ = load_policy(str(REPO / "evaluations/policies/default-tpot-0.4.yaml"))
    assert copy.tpot_slo_s == 0.4
    assert copy.model_dump(exclude={"tpot_slo_s"}) == preset.model_dump(exclude={"tpot_slo_s"})


def test_the_reported_suite_has_the_windows_and_budgets_it_promises():
    suite = load_suite(REPO / "evaluations" / "suite.yaml")
    regimes = [w.regime for w in suite.windows]
    assert regimes.count("capacity") >= 2 and regimes.count("compute") >= 1
    assert {w.trace for w in suite.windows} == {"azure-code", "azure-conv"}
    assert any(b.total_mb == 329 for b in suite.budgets) and any(b.kv_gib for b in suite.budgets)
    assert suite.repetitions >= 3
    assert {s.kind for s in suite.systems} == {"fp16", "fp16-compiled", "w4", "morphserve"}


def test_suite_v2_runs_the_calibrated_windows_at_their_budgets():
    suite = load_suite(REPO / "evaluations" / "suite-v2.yaml")
    cells = {(w.name, b.name) for w, b in suite.cells()}
    assert cells == {("conv-2130-x2", "329MB"), ("conv-1640-x1.5", "329MB"), ("conv-1640-x3", "329MB")}
    assert [w.regime for w in suite.windows] == ["capacity", "capacity", "compute"]
    policies = {s.policy for s in suite.systems if s.kind == "morphserve"}
    assert policies == {"accuracy", "default", "evaluations/policies/threshold-accuracy-v1.yaml"}
    assert (REPO / "evaluations/policies/threshold-accuracy-v1.yaml").is_file()
    assert suite.repetitions >= 3


def test_a_field_added_later_keeps_old_suites_fingerprints():
    recorded = json.loads((REPO / "evaluations/results/suite-v1/suite.json").read_text())["fingerprint"]
    assert load_suite(REPO / "evaluations" / "suite.yaml").fingerprint() == recorded


@pytest.mark.parametrize("change, message", [
    ("repetitions: 0", "repetitions"),
    ("baseline: nope", "baseline 'nope'"),
    ("drain_s: -1", "drain_s"),
    ("colour: red", "unknown key 'colour'"),
])
def test_suite_errors_name_the_file_and_the_key(tmp_path, change, message):
    path = _write(tmp_path, SUITE + change + "\n")
    with pytest.raises(MorphServeError) as e:
        load_suite(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_suite_cross_field_rules(tmp_path):
    bad_budget = SUITE.replace("{name: big, kv_gib: 1}", "{name: big, kv_gib: 1, total_mb: 3}")
    with pytest.raises(MorphServeError, match="exactly one of total_mb and kv_gib"):
        load_suite(_write(tmp_path, bad_budget))
    with pytest.raises(MorphServeError, match="needs a policy"):
        load_suite(_write(tmp_path, SUITE.replace("policy: accuracy", "budgets: [big]")))
    with pytest.raises(MorphServeError, match="not valid YAML at line"):
        load_suite(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(MorphServeError, match="unknown budget"):
        load_suite(_write(tmp_path, SUITE.replace("budgets: [small]", "budgets: [tiny]")))
    with pytest.raises(MorphServeError, match="hold_level"):
        load_suite(_write(tmp_path, SUITE.replace("{name: w4, kind: w4}", "{name: w4, kind: w4, hold_level: 30}")))
    held = load_suite(_write(tmp_path, SUITE.replace("policy: accuracy", "policy: accuracy, hold_level: 30")))
    assert [s.hold_level for s in held.systems if s.kind == "morphserve"] == [30]


def test_runs_rotate_so_no_system_always_goes_first(tmp_path):
    suite = load_suite(_write(tmp_path, SUITE))
    order = run_order(suite)
    assert len(order) == 3 * (4 + 3)
    firsts = {rep: [s.name for r, w, b, s in order if r == rep and b.name == "small"][0] for rep in range(3)}
    assert [s.name for s in suite.systems_at(suite.windows[0], suite.budgets[1])] == ["fp16", "w4", "ms"]
    assert len(set(firsts.values())) == 3
    # repetition-major: every cell's first repetition runs before any second one
    reps = [r for r, *_ in order]
    assert reps == sorted(reps)
    assert suite.budgets[1].total_bytes(269_000_000) == 269_000_000 + 2**30


def test_quality_charges_prompts_and_tokens_at_the_level_in_force(tmp_path):
    log = tmp_path / "transitions.jsonl"
    log.write_text(json.dumps({"levels": [[100.0, 0.0, 30], [101.0, 0.0, 0]]}) + "\n" +  # warm-up
                   json.dumps({"levels": [[205.0, 0.0, 8]]}) + "\n" +
                   json.dumps({"levels": [[207.5, 0.0, 4], [208.5, 0.0, 0]]}) + "\n")
    changes = quality.level_changes(log)
    assert changes[0] == (100.0, 30) and changes[-1] == (208.5, 0)
    rows = [{"ok": True, "start_mono": 200.0, "input_len": 100, "output_len": 5, "ttft_s": 4.0,
             "token_offsets_s": [4.0, 5.5, 6.0, 8.0, 9.0]},  # at 204 (0), 205.5 (8), 206 (8), 208 (4), 209 (0)
            {"ok": False, "start_mono": 200.0, "input_len": 50, "output_len": 0, "ttft_s": None}]
    counts = quality.tokens_by_level(rows, quality.LevelAt(changes))
    assert counts == {"prompt": {0: 100}, "output": {0: 2, 8: 2, 4: 1}}
    curve = {0: 10.0, 4: 11.0, 8: 12.0, 30: 20.0}
    q = quality.quality_of_run(rows, curve, changes, 0)
    expected = math.exp((102 * math.log(10) + 2 * math.log(12) + math.log(11)) / 105)
    assert q["ppl"] == pytest.approx(expected)
    # A request cut at the deadline after streaming 3 tokens (served at level 8): its prompt
    # and those tokens are charged too.
    cut = {"ok": False, "start_mono": 200.0, "input_len": 40, "output_len": 0, "ttft_s": None,
           "token_offsets_s": [5.2, 5.6, 6.1], "served_tokens": 3}
    counts = quality.tokens_by_level(rows + [cut], quality.LevelAt(changes))
    assert counts == {"prompt": {0: 100, 8: 40}, "output": {0: 2, 8: 5, 4: 1}}
    assert q["ppl"] == pytest.approx(expected) and q["ppl_increase"] == pytest.approx(expected / 10 - 1)
    static = quality.quality_of_run(rows, curve, None, 30)
    assert static["ppl"] == pytest.approx(20.0)


def test_the_servers_own_count_charges_a_token_at_the_level_that_computed_it():
    """A prompt computed at level 4 whose first token reaches the client after the move to
    12 is charged 12 by the client's clock; the server's count between its two readings
    (after the warm-up, after the replay) charges it 4, and that is the reported figure."""
    changes = [(100.0, 4), (102.0, 12)]
    rows = [{"ok": True, "start_mono": 99.0, "input_len": 90, "output_len": 2, "ttft_s": 3.05,
             "token_offsets_s": [3.05, 3.2]}]  # computed just before 102, arrived just after
    curve = {0: 10.0, 4: 10.5, 12: 12.0}
    warm = {"by_level": {"0": 50, "4": 0}, "through_twins": {}, "twin_min_tokens": None}
    after = {"by_level": {"0": 50, "4": 91, "12": 1}, "through_twins": {}, "twin_min_tokens": None}
    served = quality.served_between(warm, after)
    assert served == {4: 91, 12: 1}  # the warm-up's 50 tokens at level 0 are not the replay's
    q = quality.quality_of_run(rows, curve, changes, 0, served=served)
    assert q["levels_from"] == "server steps" and q["server_tokens_by_level"] == {"4": 91, "12": 1}
    assert q["ppl_increase"] == pytest.approx(math.exp((91 * math.log(1.05) + math.log(1.2)) / 92) - 1)
    assert q["ppl_increase_client_clock"] == pytest.approx(0.2)  # every token arrived after the move
    assert q["tokens_by_level"] == {"prompt": {"12": 90}, "output": {"12": 2}}  # kept, by arrival
    client = quality.quality_of_run(rows, curve, changes, 0)
    assert client["levels_from"] == "client arrival" and client["ppl_increase"] == pytest.approx(0.2)
    assert quality.served_between(warm, None) is None and quality.served_between(None, after) == {4: 91, 12: 1, 0: 50}
    assert quality.quality_of_run(rows, curve, None, 0)["levels_from"] == "static"


@pytest.mark.parametrize("ppl0", [13.123456789, 21.7, 9.87654321, 31.41592653589793])
def test_a_run_served_wholly_at_full_precision_costs_exactly_nothing(ppl0):
    """Not approximately: exp(mean log p) / p - 1 read 4.4e-16 on one CPU, and a static FP16
    row that shows a quality cost is wrong on its face."""
    rows = [{"ok": True, "start_mono": 0.0, "input_len": 37 + i, "output_len": 3, "ttft_s": 1.0,
             "token_offsets_s": [1.0, 1.1, 1.2]} for i in range(7)]
    curve = {0: ppl0, 8: ppl0 * 1.1}
    q = quality.quality_of_run(rows, curve, None, 0)
    assert q["ppl_increase"] == 0.0 and q["ppl"] == ppl0
    assert quality.quality_of_run(rows, curve, None, 8)["ppl_increase"] == pytest.approx(0.1)


def test_kv_cost_is_the_curve_times_the_factors_token_weighted():
    from morphserve.evaluation import kv_quality
    from morphserve.offline import kv_cost

    assert kv_cost.levels_to_measure(60) == [0, 15, 30, 45, 60]
    assert kv_cost.levels_to_measure(30) == [0, 7, 15, 22, 30]
    factors = kv_cost.factors_by_level({0: 1.02, 2: 1.08, 4: 1.04}, 4)
    assert factors[0] == 1.02 and factors[2] == 1.08 and factors[4] == 1.04
    assert factors[1] == pytest.approx(math.sqrt(1.02 * 1.08))  # log-linear between measured levels
    with pytest.raises(ValueError, match="ends of the ladder"):
        kv_cost.factors_by_level({0: 1.0, 3: 1.1}, 4)
    # A run's charge equals reading it off the curve multiplied by the factors.
    rows = [{"ok": True, "start_mono": 0.0, "input_len": 10, "output_len": 3, "ttft_s": 1.0,
             "token_offsets_s": [1.0, 2.0, 3.0]}]
    changes = [(1.5, 2), (2.5, 4)]
    curve = {0: 10.0, 1: 10.5, 2: 11.0, 3: 11.5, 4: 12.0}
    record = quality.quality_of_run(rows, curve, changes, 0)
    both = quality.quality_of_run(rows, {k: v * factors[k] for k, v in curve.items()}, changes, 0)
    charged = kv_quality.charged(record, factors)
    assert charged["ppl"] == pytest.approx(both["ppl"])
    assert charged["ppl_output_tokens"] == pytest.approx(both["ppl_output_tokens"])
    assert charged["ppl_increase"] == pytest.approx(both["ppl"] / 10.0 - 1)  # still against bf16 weights and KV
    assert charged["ppl_increase_weights_only"] == record["ppl_increase"] and charged["kv_ppl_factor"] > 1.02
    # charging a charged record again changes nothing (rescoring an evaluation folder is safe)
    assert kv_quality.charged({**record, **charged}, factors) == charged
    # a static system sits at one level: its factor exactly
    static = kv_quality.charged(quality.quality_of_run(rows, curve, None, 2), factors)
    assert static["kv_ppl_factor"] == pytest.approx(1.08) and static["ppl"] == pytest.approx(11.0 * 1.08)


def _run(system, rep, violations, ttft, tpot=0.1, mem=2000.0, ppl=0.0):
    return {"system": system, "repetition": rep, "requests": 10, "completed": 10, "slo_violations": violations,
            "slo_attainment": 1 - violations / 10, "ttft_p50": ttft / 2, "ttft_p95": ttft, "ttft_p99": ttft,
            "tpot_p95": tpot, "throughput_tok_s": 10.0, "peak_rss_anon_mib": mem, "peak_rss_file_mib": 100.0,
            "peak_rss_total_mib": mem + 100, "ppl_increase": ppl}


def test_ratios_are_paired_by_repetition_and_overlapping_ranges_are_ties():
    runs = {"fp16": {1: _run("fp16", 1, 10, 8.0), 2: _run("fp16", 2, 9, 6.0), 3: _run("fp16", 3, 10, 7.0)},
            "w4": {1: _run("w4", 1, 10, 9.0, ppl=0.2), 2: _run("w4", 2, 8, 5.0, ppl=0.2), 3: _run("w4", 3, 10, 7.0, ppl=0.2)},
            "ms": {1: _run("ms", 1, 1, 2.0, ppl=0.05), 2: _run("ms", 2, 0, 2.0, ppl=0.05),
                   3: _run("ms", 3, 0, math.inf, ppl=0.05)}}
    out = aggregate.summarize_cell(runs, "fp16", "w4")
    w4 = out["w4"]["vs_baseline"]
    assert w4["ttft_p95_speedup"]["verdict"] == "tie"  # 0.89x .. 1.2x straddles 1
    ms = out["ms"]["vs_baseline"]
    assert ms["ttft_p95_speedup"]["low"] == 0.0 and ms["ttft_p95_speedup"]["verdict"] == "tie"
    assert ms["violations_fewer"]["median"] == 1.0 and ms["violations_fewer"]["low"] == pytest.approx(0.9)
    assert ms["violations_fewer"]["verdict"] == "better"
    t = out["ms"]["targets"]
    assert t["violations_90pct_fewer"] is True and t["ttft_p95_2x"] is False  # the worst repetition decides
    assert t["quality_third_of_static"] is True
    assert out["fp16"]["ttft_p95"]["median"] == 7.0 and out["fp16"]["ttft_p95"]["low"] == 6.0
    assert "vs_baseline" not in out["fp16"]
    assert out["fp16"]["heap_trims"] is None  # no trimmer counters recorded for a plain server


def test_the_heap_trimmers_counts_are_summarized_per_system():
    runs = {"fp16": {rep: _run("fp16", rep, 10, 8.0) for rep in (1, 2, 3)},
            "ms": {rep: {**_run("ms", rep, 5, 4.0), "heap_trim": {"calls": calls, "seconds": 1.3},
                         "boundary": {"n": 1200, "total_s": calls / 500}}
                   for rep, calls in ((1, 672), (2, 666), (3, 667))}}
    out = aggregate.summarize_cell(runs, "fp16", None)
    assert out["ms"]["heap_trims"] == {"median": 667, "low": 666, "high": 672, "n": 3}
    assert out["fp16"]["heap_trims"] is None
    # the controller's time between steps, beside it
    assert out["ms"]["controller_s"]["median"] == pytest.approx(1.334) and out["fp16"]["controller_s"] is None


def test_vllms_preemptions_are_summarized_for_every_system_that_recorded_them():
    runs = {"fp16": {rep: {**_run("fp16", rep, 10, 8.0), "vllm_counters": {"preemptions": n, "steps": 900}}
                     for rep, n in ((1, 14.0), (2, 18.0), (3, 13.0))},
            "ms": {rep: {**_run("ms", rep, 5, 4.0), "vllm_counters": {"error": "vLLM's /metrics not read: x"}}
                   for rep in (1, 2, 3)}}
    out = aggregate.summarize_cell(runs, "fp16", None)
    assert out["fp16"]["preemptions"] == {"median": 14.0, "low": 13.0, "high": 18.0, "n": 3}
    assert out["ms"]["preemptions"] is None  # a failed read is no figure
    table = render.table({"cells": [{"window": "w", "budget": "b", "systems": out}]})
    assert "| preemptions |" in table and "| 14 [13, 18] |" in table


def test_the_workers_cpu_and_faults_are_summarized_over_every_rank():
    work = lambda cpu, faults: {"VLLM::Worker_TP0": {"cpu_s": cpu, "minor_faults": faults},  # noqa: E731
                                "VLLM::Worker_TP1": {"cpu_s": cpu, "minor_faults": faults},
                                "VLLM::EngineCor": {"cpu_s": 99.0, "minor_faults": 5}}
    runs = {"fp16": {rep: {**_run("fp16", rep, 10, 8.0), "process_work": work(c, f)}
                     for rep, c, f in ((1, 60.0, 1000), (2, 70.0, 3000), (3, 65.0, 2000))},
            "ms": {rep: _run("ms", rep, 5, 4.0) for rep in (1, 2, 3)}}  # recorded before process_work
    out = aggregate.summarize_cell(runs, "fp16", None)
    assert out["fp16"]["worker_cpu_s"] == {"median": 130.0, "low": 120.0, "high": 140.0, "n": 3}
    assert out["fp16"]["worker_minor_faults"]["median"] == 4000
    assert out["ms"]["worker_cpu_s"] is None
    # vLLM's uni executor runs the model in the engine core: that is the process counted then
    uni = {1: {**_run("fp16", 1, 10, 8.0), "process_work": {"VLLM::EngineCor": {"cpu_s": 50.0, "minor_faults": 9},
                                                          "python": {"cpu_s": 3.0, "minor_faults": 1}}}}
    assert aggregate.summarize_cell({"fp16": uni}, "fp16", None)["fp16"]["worker_cpu_s"]["median"] == 50.0
    table = render.table({"cells": [{"window": "w", "budget": "b", "systems": out}]})
    assert "| worker CPU s |" in table and "| 130.0 [120.0, 140.0] |" in table


def test_unequal_work_is_caught():
    base = {"system": "fp16", "repetition": 1, "trace_sha256": "x", "input_lens": [5, 6], "ok": [True, True],
            "output_lens": [3, 4], "requested_output_lens": [3, 4]}
    assert aggregate.check_equal_work([base, {**base, "system": "ms", "ok": [True, False], "output_lens": [3, 0]}]) == []
    problems = aggregate.check_equal_work([base, {**base, "system": "ms", "output_lens": [3, 2]},
                                           {**base, "system": "w4", "trace_sha256": "y", "input_lens": [5, 7]}])
    assert any("request 1 generated 2 tokens" in p for p in problems)
    assert any("different trace" in p for p in problems) and any("prompt lengths differ" in p for p in problems)


def test_machine_record_reads_cpu_isa_and_memory():
    from morphserve.evaluation.machine import describe, label

    cpu = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f amx_tile amx_bf16\n"
    m = describe(cpu, "MemTotal:       24000000 kB\n")
    assert (m["cpu"], m["amx"], m["avx512"], m["mem_gib"]) == ("Intel(R) Xeon(R) Processor", True, True, 23)
    assert "(AMX)" in label(m)
    m = describe("model name\t: AMD EPYC\nflags\t: fpu avx512f\n", "")
    assert not m["amx"] and "no AMX" in label(m)


def test_runs_of_two_generations_of_one_cpu_name_are_not_mixed():
    """A results folder records the CPU's family and model: a Zen 4's runs and a Zen 5's (both
    "AMD EPYC", both AVX-512) are different machines; a folder recorded before the numbers
    were (no family) still resumes on a CPU of its name."""
    from morphserve.evaluation.machine import describe, label, same_machine

    zen4 = describe("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nflags\t: fpu avx512f\n", "")
    zen5 = describe("model name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\nflags\t: fpu avx512f\n", "")
    assert "family 26 model 2" in label(zen5) and (zen4["family"], zen4["model_number"]) == ("25", "17")
    assert same_machine(zen4, dict(zen4)) and not same_machine(zen4, zen5)
    older = {k: v for k, v in zen4.items() if k not in ("family", "model_number")}
    assert same_machine(older, zen5)
    assert not same_machine(older, {**zen5, "cpu": "Intel(R) Xeon(R) Processor"})


def test_plain_systems_need_no_w8a8_tier_and_a_w8a8_system_names_its_twin(tmp_path):
    """A pack without tiers still serves fp16 and w4 baselines; a w8a8 system on it is
    refused in one line, and on a tiered pack it serves quantized-w8a8/."""
    from morphserve.errors import MorphServeError
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import Budget, Suite, System, Window
    from morphserve.offline import pack as packfmt
    from tests.test_hardening_fakes import make_model, make_pack, make_tiered_pack

    model = make_model(tmp_path / "model")
    suite = Suite(name="s", windows=[Window(name="w", trace="azure-conv", start_s=0, duration_s=5, rate_scale=1, length_scale=1,
                                  output_scale=1, regime="light", why="test")],
                  budgets=[Budget(name="b", total_mb=400)], systems=[System(name="fp16", kind="fp16")],
                  static_quantized=None)
    plain = make_pack(tmp_path / "plain", model)
    for kind in ("fp16", "w4"):
        cmd, _ = systems.server_command(System(name=kind, kind=kind), suite.budgets[0], suite, model, plain, 1, tmp_path)
        assert "--model" in cmd
    with pytest.raises(MorphServeError, match="W8A8 tier"):
        systems.server_command(System(name="w8", kind="w8a8"), suite.budgets[0], suite, model, plain, 1, tmp_path)
    tiered = make_tiered_pack(tmp_path / "tiered", model)
    cmd, _ = systems.server_command(System(name="w8", kind="w8a8"), suite.budgets[0], suite, model, tiered, 1, tmp_path)
    assert cmd[cmd.index("--model") + 1] == str(tiered / packfmt.load_manifest(tiered).tiers[0].quantized_dir)


def _fake_model_suite_and_pack(tmp_path):
    """A fake model, a one-window suite at 400 MB and a tiered pack of that model."""
    from morphserve.evaluation.suite import Budget, Suite, System, Window
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    suite = Suite(name="s", windows=[Window(name="w", trace="azure-conv", start_s=0, duration_s=5, rate_scale=1,
                                            length_scale=1, output_scale=1, regime="light", why="test")],
                  budgets=[Budget(name="b", total_mb=400)], systems=[System(name="fp16", kind="fp16")],
                  static_quantized=None)
    return model, suite, make_tiered_pack(tmp_path / "tiered", model)


def test_a_morphserve_system_passes_its_compress_mode_and_tiers_and_only_it_takes_them(tmp_path):
    from pydantic import ValidationError

    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    model, suite, tiered = _fake_model_suite_and_pack(tmp_path)
    ours = System(name="m", kind="morphserve", policy="default", compress_mode="background", tiers=["w8a8"])
    cmd, _ = systems.server_command(ours, suite.budgets[0], suite, model, tiered, 1, tmp_path)
    assert cmd[cmd.index("--compress-mode") + 1] == "background" and cmd[cmd.index("--tiers") + 1] == "w8a8"
    cmd, _ = systems.server_command(System(name="d", kind="morphserve", policy="default"), suite.budgets[0], suite,
                                    model, tiered, 1, tmp_path)
    assert "--compress-mode" not in cmd and "--tiers" not in cmd  # serve's own defaults
    for extra in ({"compress_mode": "sync"}, {"tiers": ["w8a8"]}):
        with pytest.raises(ValidationError, match="only a morphserve system"):
            System(name="w8", kind="w8a8", **extra)


def test_every_serve_flag_a_morphserve_system_sets_reaches_serve_and_only_it_takes_them(tmp_path):
    from pydantic import ValidationError

    from morphserve.cli.commands import build_parser
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import SERVE_FLAGS, System

    model, suite, tiered = _fake_model_suite_and_pack(tmp_path)
    values = {"heap_trim_interval_s": 5.0, "heap_trim_mode": "thread", "heap_trim_min_growth_mb": 32.0,
              "frontend_heap_trim_interval_s": 10.0, "frontend_heap_trim_mode": "idle", "kv_cold_cache_grace_s": 3.0,
              "kv_cold_tail": "on", "kv_huge_pages": "on"}
    assert set(values) == set(SERVE_FLAGS)
    cmd, _ = systems.server_command(System(name="m", kind="morphserve", policy="default", **values),
                                    suite.budgets[0], suite, model, tiered, 1, tmp_path)
    serve_args, _ = build_parser().parse_known_args(cmd[cmd.index("morphserve.cli") + 1:])  # the rest: vLLM's
    assert serve_args.heap_trim_interval == 5.0 and serve_args.heap_trim_mode == "thread"
    assert serve_args.heap_trim_min_growth_mb == 32.0 and serve_args.frontend_heap_trim_interval == 10.0
    assert serve_args.frontend_heap_trim_mode == "idle"
    assert serve_args.kv_cold_cache_grace == 3.0 and serve_args.kv_cold_tail == "on"
    assert serve_args.kv_huge_pages == "on"
    cmd, _ = systems.server_command(System(name="d", kind="morphserve", policy="default"), suite.budgets[0], suite,
                                    model, tiered, 1, tmp_path)
    assert not set(SERVE_FLAGS.values()) & set(cmd)  # serve's own defaults
    for field, value in values.items():
        with pytest.raises(ValidationError, match="only a morphserve system"):
            System(name="w8", kind="w8a8", **{field: value})


def test_a_morphserve_system_that_names_its_tiers_is_read_on_their_ladder(tmp_path):
    """A tiered pack served as bf16 <-> W8A8 only (`tiers: [w8a8]`): its top is L, not 2L
    (the warm-up's 0 -> top must be a level it serves) and its curve is the W8A8 tier's."""
    from morphserve.evaluation.runner import served_ladder
    from morphserve.offline import pack as packfmt
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    manifest = packfmt.load_manifest(make_tiered_pack(tmp_path / "tiered", model))
    n = manifest.num_layers
    quality = {"ladder": {"ppl": {str(k): 10.0 + k for k in range(2 * n + 1)}},
               "tiers": {"w8a8": {"ppl": {str(k): 10.0 + k / 2 for k in range(n + 1)}}},
               "orders": {"lis": {"ppl": {str(k): 10.0 + 2 * k for k in range(n + 1)}}}}
    runs_all = lambda tiers: {t: None for t in tiers}  # noqa: E731
    top, curve = served_ladder(manifest, quality, None, runs_all)
    assert top == 2 * n and curve[2 * n] == 10.0 + 2 * n
    top, curve = served_ladder(manifest, quality, ["w8a8"], runs_all)
    assert top == n and curve[n] == 10.0 + n / 2 and sorted(curve) == list(range(n + 1))


def test_an_fp32_suite_serves_every_system_in_fp32_and_sizes_kv_from_fp32_weights(tmp_path):
    """`dtype: float32` (the fast dtype where bf16 is emulated): every server gets --dtype,
    and KV = budget - weights as the engine holds them (floats at 4 bytes, int8 as stored),
    so FP16, static W8A8 and MorphServe still share one weights + KV budget."""
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import Budget, Suite, System, Window
    from morphserve.offline import pack as packfmt
    from morphserve.evaluation.held_bytes import engine_weight_bytes
    from morphserve.runtime.kv_sizing import model_weight_bytes
    from morphserve.vllm.kernels import int8_held_bytes
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    tiered = make_tiered_pack(tmp_path / "tiered", model)
    w8 = tiered / packfmt.load_manifest(tiered).tiers[0].quantized_dir
    window = Window(name="w", trace="azure-conv", start_s=0, duration_s=5, rate_scale=1, length_scale=1,
                    output_scale=1, regime="light", why="test")
    suite = Suite(name="s", windows=[window], budgets=[Budget(name="b", total_mb=400)], dtype="float32",
                  systems=[System(name="fp16", kind="fp16")], static_quantized=None)
    bf16, fp32 = model_weight_bytes(model), model_weight_bytes(model, "float32")
    assert fp32 == 2 * bf16 - 2 * _non_tensor_bytes(model)  # every tensor of the fake model is bf16
    assert model_weight_bytes(model, "torch.bfloat16") == bf16 - _non_tensor_bytes(model)
    int8 = model_weight_bytes(w8, "float32")
    stored = model_weight_bytes(w8)
    assert stored - _non_tensor_bytes(w8) < int8 < 2 * (stored - _non_tensor_bytes(w8))  # int8 stays, floats double
    # static W8A8's int8 linears as vLLM's kernel holds them (fp32 scales, its own rows), as MorphServe counts its twins
    held = engine_weight_bytes(w8, "float32", int8_held_bytes)
    assert held >= int8
    for system, weights in ((System(name="fp16", kind="fp16"), fp32), (System(name="w8", kind="w8a8"), held),
                            (System(name="m", kind="morphserve", policy="default"), fp32)):
        cmd, _ = systems.server_command(system, suite.budgets[0], suite, model, tiered, 1, tmp_path)
        assert cmd[cmd.index("--dtype") + 1] == "float32"
        assert int(cmd[cmd.index("--kv-cache-memory-bytes") + 1]) == 400 * 10**6 - weights
    default = suite.model_copy(update={"dtype": "auto"})
    cmd, _ = systems.server_command(System(name="fp16", kind="fp16"), suite.budgets[0], default, model, tiered, 1,
                                    tmp_path)
    assert "--dtype" not in cmd and int(cmd[cmd.index("--kv-cache-memory-bytes") + 1]) == 400 * 10**6 - bf16


def _non_tensor_bytes(model: Path) -> int:
    """A safetensors file's header: in its size, not in any tensor."""
    import struct

    return sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in model.glob("*.safetensors"))


def _cut_replay(tmp_path, monkeypatch, events: list[str]):
    """`runner._replay` over a stand-in load generator that announces its start and runs
    until the server is stopped (so every call is cut at its deadline), and a short suite."""
    from morphserve.evaluation import runner
    from morphserve.evaluation.suite import Budget, Suite, System, Window

    class FakeReplay:
        returncode = None

        def __init__(self, cmd, stdout, stderr):
            (tmp_path / "bench.log").write_text("Starting main benchmark run\n")

        def poll(self):
            if "stop" in events and self.returncode is None:
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(runner.subprocess, "Popen", FakeReplay)
    monkeypatch.setattr(runner, "stop_server", lambda proc: events.append("stop"))
    window = Window(name="w", trace="azure-conv", start_s=0, duration_s=0.2, rate_scale=1, length_scale=1,
                    output_scale=1, regime="light", why="test")
    suite = Suite(name="s", windows=[window], budgets=[Budget(name="b", total_mb=400)], drain_s=0.2,
                  systems=[System(name="fp16", kind="fp16")], static_quantized=None)
    return lambda **hooks: runner._replay(suite, window, suite.systems[0], tmp_path, "http://x", tmp_path,
                                          proc=None, **hooks)


def test_a_cut_runs_decisions_are_read_while_the_server_still_runs(tmp_path, monkeypatch):
    """The decisions of a run cut at its deadline are read before the server is stopped
    (read after the stop, every cut run recorded `Connection refused`), and only a cut run
    keeps them (an uncut run reads them, with its ledger, after the replay)."""
    events: list[str] = []
    replay = _cut_replay(tmp_path, monkeypatch, events)

    def read():
        events.append("read")
        return {"decisions": [{"kind": "hold", "level": 5}]}

    record = replay(before_cut=read)
    assert events == ["read", "stop"]
    assert record["cut_at_deadline"] and record["decisions"] == [{"kind": "hold", "level": 5}]
    events.clear()
    assert "decisions" not in replay()


def test_a_cut_runs_vllm_counters_are_read_just_before_the_cut(tmp_path, monkeypatch):
    """vLLM's counters die with the server: a cut run (an overloaded row, where preemptions
    matter most) read them after the stop and recorded `Connection refused` in every cut run
    of suite-v4-zen4d. They are read at the deadline, before the stop."""
    events: list[str] = []
    replay = _cut_replay(tmp_path, monkeypatch, events)

    def counters():
        events.append("counters")
        return {"preemptions": 7.0}

    record = replay(at_cut=counters)
    assert events == ["counters", "stop"]
    assert record["cut_at_deadline"] and record["counters_at_cut"] == {"preemptions": 7.0}
    events.clear()
    assert "counters_at_cut" not in replay()  # nothing asked at the cut: nothing returned


def test_a_cut_runs_decisions_are_read_best_effort():
    """Before a replay's drain deadline the policy's last decisions (and the heap trimmer's
    counters) are kept when the server answers, and a failed read is recorded instead of
    failing the run."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from morphserve.evaluation import systems

    trims = {"interval_s": 0.5, "min_growth_bytes": 0, "running": True, "calls": 40, "skipped": 0, "seconds": 0.2}
    served = {"by_level": {"0": 900}, "through_twins": {"0": 300}, "twin_min_tokens": 128}
    boundary = {"n": 1200, "total_s": 0.9, "p50": 700.0, "p99": 7000.0, "max": 9000.0}
    answers = {"/morphserve/state": (200, {"recent_decisions": [{"kind": "hold", "level": 12}],
                                           "signals": {"quality_increase": 0.01, "quality_tokens": 900},
                                           "memory": {"heap_trim": trims}, "served_tokens": served,
                                           "boundary_us": boundary})}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status, body = answers.get(self.path.split("?")[0], (504, {"error": "busy"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert systems.last_decisions(base) == {"decisions": [{"kind": "hold", "level": 12}], "heap_trim": trims,
                                                "boundary": boundary}
        # after a replay: the ledger, the decisions and the trimmer's counters, one state read
        assert systems.policy_record(base) == {"ledger": {"ppl_increase": 0.01, "tokens": 900},
                                               "decisions": [{"kind": "hold", "level": 12}], "heap_trim": trims,
                                               "served_by_level": served, "boundary": boundary}
        answers.clear()  # the state read now answers 504, as a server busy past its step does
        failed = systems.last_decisions(base, timeout=5)
        assert failed["decisions"] == [] and "504" in failed["decisions_error"]
    finally:
        server.shutdown()


def test_a_run_waits_for_idle_cores_and_a_busy_start_is_flagged():
    from morphserve.evaluation.machine import idle_wait_s, wait_until_idle

    now = [0.0]

    def clock():
        return now[0]

    def readings(loads):
        it = iter(loads)

        def busy(interval):
            now[0] += interval
            return next(it)
        return busy

    # the last server's processes exit: two busy readings, then idle
    seen = wait_until_idle(readings([1.6, 1.2, 0.1]), cores=2, wait_s=60, clock=clock)
    assert seen == {"load": 0.1, "cores": 2, "waited_s": 3.0, "busy": False}
    # someone else's work holds a core for the whole wait: given up on, and flagged
    now[0] = 0.0
    seen = wait_until_idle(readings([1.0] * 100), cores=2, wait_s=5, clock=clock)
    assert seen["busy"] and seen["load"] == 1.0 and 5 <= seen["waited_s"] < 7
    assert idle_wait_s({}) == 60 and idle_wait_s({"MORPHSERVE_IDLE_WAIT_S": "2"}) == 2
    assert idle_wait_s({"MORPHSERVE_IDLE_WAIT_S": "x"}) == 60 and idle_wait_s({"MORPHSERVE_IDLE_WAIT_S": "-1"}) == 0


def test_the_report_lists_runs_started_on_a_busy_machine(tmp_path):
    from morphserve.evaluation.cli import busy_note, busy_starts
    from morphserve.evaluation.runner import run_dir

    suite = load_suite(_write(tmp_path, SUITE))
    out = tmp_path / "out"
    (window, budget), system = suite.cells()[0], suite.systems[0]
    idle = {"load": 0.1, "cores": 2, "waited_s": 1.0, "busy": False}
    runs = ({"cpu_before": {"load": 1.4, "cores": 2, "waited_s": 60.0, "busy": True}},
            {"cpu_before": idle, "cpu_during": {"others_cores": 0.62, "seconds": 115.0, "busy": True}},
            {"cpu_before": idle, "cpu_during": {"others_cores": 0.01, "seconds": 115.0, "busy": False}})
    for rep, run in enumerate(runs):
        folder = run_dir(out, rep, window, budget, system)
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(run))
    starts = busy_starts(suite, out)
    name = f"{window.name}/{budget.name}/{system.name}"
    assert starts == [f"{name} rep 1 (1.4 of 2 cores in use at its start)",
                      f"{name} rep 2 (other work used 0.62 cores on average during its replay)"]
    assert starts[1] in busy_note({"busy_starts": starts}) and busy_note({"busy_starts": []}) == ""


def test_static_systems_are_charged_where_every_layer_is_in_their_tier(tmp_path):
    """All-W8A8 is level L whether the ladder is tiered (its W8A8 half) or W8A8-only (its top);
    all-W4A16 is the top where W4A16 is served. Before, all-W8A8 was taken as half the top,
    which on a W8A8-only pack charged static W8A8 the perplexity of 15 layers, not 30."""
    from morphserve.evaluation.runner import static_levels
    from morphserve.offline import pack as packfmt
    from morphserve.offline.ladder import Ladder
    from tests.test_hardening_fakes import make_model, make_pack, make_tiered_pack

    model = make_model(tmp_path / "model")
    tiered = packfmt.load_manifest(make_tiered_pack(tmp_path / "tiered", model))
    n = tiered.num_layers
    assert static_levels(Ladder.from_manifest(tiered), n) == {"w8a8": n, "w4": 2 * n}
    assert static_levels(Ladder.from_manifest(tiered, ["w8a8"]), n) == {"w8a8": n}  # a CPU without W4A16
    w4_only = packfmt.load_manifest(make_pack(tmp_path / "w4", model))
    assert static_levels(Ladder.from_manifest(w4_only), n) == {"w4": n}


def test_a_static_run_charged_at_another_level_is_read_again_from_its_requests(tmp_path):
    from morphserve.evaluation.runner import rescore_static_quality, run_dir

    suite = load_suite(_write(tmp_path, SUITE.replace("{name: w4, kind: w4}", "{name: w8, kind: w8a8}")
                                      + "static_quantized: w8\n"))
    out = tmp_path / "out"
    (window, budget) = suite.cells()[0]
    w8, fp16 = next(s for s in suite.systems if s.kind == "w8a8"), suite.systems[0]
    rows = [{"ok": True, "start_mono": 1.0, "input_len": 10, "output_len": 2, "ttft_s": 0.5,
             "token_offsets_s": [0.5, 0.6]}]
    curve = {k: 10.0 + k for k in range(31)}
    order = [(0, window, budget, w8), (0, window, budget, fp16)]
    for _, _, _, system in order:
        folder = run_dir(out, 0, window, budget, system)
        folder.mkdir(parents=True)
        (folder / "requests.jsonl").write_text(json.dumps(rows[0]) + "\n")
        # as the old code wrote it: W8A8 read at 15 (half a W8A8-only ladder's top), no level recorded
        (folder / "run.json").write_text(json.dumps({"ppl": 25.0, "ppl_increase": 0.5, "keep": 1}))
    rescore_static_quality(out, order, {s.name: (30, curve) for s in suite.systems}, {"w8a8": 30}, {})
    again = json.loads((run_dir(out, 0, window, budget, w8) / "run.json").read_text())
    assert again["static_level"] == 30 and again["keep"] == 1
    assert again["ppl"] == pytest.approx(40.0) and again["ppl_increase"] == pytest.approx(3.0)
    assert again["tokens_by_level"] == {"prompt": {"30": 10}, "output": {"30": 2}}
    untouched = json.loads((run_dir(out, 0, window, budget, fp16) / "run.json").read_text())
    assert untouched == {"ppl": 25.0, "ppl_increase": 0.5, "keep": 1}  # FP16 is level 0 whatever the ladder


def test_heap_trim_counters_are_read_from_the_memory_reading_or_none():
    from morphserve.evaluation.systems import heap_trim

    assert heap_trim({"memory": {"heap_trim": {"calls": 3}}}) == {"calls": 3}
    assert heap_trim({"memory": None}) is None  # a state read with ?memory=0
    assert heap_trim({"memory": {"error": "worker did not answer"}}) is None
    assert heap_trim({}) is None


def test_a_cut_runs_count_read_from_a_server_that_does_not_answer_is_none():
    """At a run's cut the server may be too busy (or gone) to answer: the read gives None, the
    run is then charged by arrival, and nothing raises."""
    from morphserve.evaluation.systems import served_now
    from morphserve.harness.servers import free_port

    assert served_now(f"http://127.0.0.1:{free_port()}", timeout=2.0) is None


def _server_of(tmp_path):
    """`run(system) -> (command, environment)` as the evaluation starts that system on a fake
    model and tiered pack at one budget, and `serve_args(command)`: the `morphserve serve`
    flags a MorphServe command carries, parsed as serve parses them."""
    from morphserve.cli.commands import build_parser
    from morphserve.evaluation import systems

    model, suite, tiered = _fake_model_suite_and_pack(tmp_path)

    def run(system):
        return systems.server_command(system, suite.budgets[0], suite, model, tiered, 1, tmp_path)

    def serve_args(cmd):
        return build_parser().parse_known_args(cmd[cmd.index("morphserve.cli") + 1:])[0]

    return run, serve_args


def test_huge_pages_reach_any_system_the_way_serve_would_give_them(tmp_path, monkeypatch):
    """A plain vLLM system asks for them through its environment, a MorphServe system through
    serve's flag; a system that names nothing runs as it starts (plain) or at serve's default."""
    from morphserve.evaluation.suite import System
    from morphserve.runtime import huge_pages

    monkeypatch.setattr(huge_pages, "kernel_mode", lambda sysfs=None: "madvise")
    monkeypatch.delenv(huge_pages.TORCH_ENV, raising=False)
    monkeypatch.delenv(huge_pages.TUNABLES_ENV, raising=False)
    run, serve_args = _server_of(tmp_path)
    _, env = run(System(name="w8", kind="w8a8", huge_pages="auto"))
    assert env[huge_pages.TORCH_ENV] == "1" and env[huge_pages.TUNABLES_ENV] == "glibc.malloc.hugetlb=1"
    _, env = run(System(name="w8", kind="w8a8"))
    assert huge_pages.TORCH_ENV not in env and huge_pages.TUNABLES_ENV not in env
    cmd, _ = run(System(name="m", kind="morphserve", policy="default", huge_pages="auto"))
    assert serve_args(cmd).huge_pages == "auto"
    cmd, _ = run(System(name="m", kind="morphserve", policy="default"))
    assert "--huge-pages" not in cmd


def test_large_buffers_reach_any_system_the_way_serve_would_give_them(tmp_path, monkeypatch):
    """As huge pages: plain vLLM through its environment, MorphServe through serve's flag."""
    from morphserve.evaluation.suite import System
    from morphserve.runtime import huge_pages

    monkeypatch.setattr(huge_pages, "kernel_mode", lambda sysfs=None: "madvise")
    monkeypatch.delenv(huge_pages.TUNABLES_ENV, raising=False)
    run, serve_args = _server_of(tmp_path)
    _, env = run(System(name="f", kind="fp16", large_buffers="mapped"))
    assert env[huge_pages.TUNABLES_ENV] == "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"
    _, env = run(System(name="f", kind="fp16"))
    assert huge_pages.TUNABLES_ENV not in env
    cmd, _ = run(System(name="m", kind="morphserve", policy="default", large_buffers="mapped"))
    assert serve_args(cmd).large_buffers == "mapped"
    cmd, _ = run(System(name="m", kind="morphserve", policy="default"))
    assert "--large-buffers" not in cmd


def _one_cell_suite(tmp_path):
    """A fake model, a tiered pack for it, and a one-window, one-budget (400 MB) suite."""
    from morphserve.evaluation.suite import Budget, Suite, System, Window
    from tests.test_hardening_fakes import make_model, make_tiered_pack

    model = make_model(tmp_path / "model")
    tiered = make_tiered_pack(tmp_path / "tiered", model)
    window = Window(name="w", trace="azure-conv", start_s=0, duration_s=5, rate_scale=1, length_scale=1,
                    output_scale=1, regime="light", why="test")
    suite = Suite(name="s", windows=[window], budgets=[Budget(name="b", total_mb=400)],
                  systems=[System(name="fp16", kind="fp16")], static_quantized=None)
    return model, tiered, suite


def test_a_systems_step_token_count_reaches_its_server_and_no_count_leaves_vllms(tmp_path):
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    model, tiered, suite = _one_cell_suite(tmp_path)
    for kind in ("fp16", "w8a8"):
        cmd, _ = systems.server_command(System(name="c", kind=kind, max_num_batched_tokens=256), suite.budgets[0],
                                        suite, model, tiered, 1, tmp_path)
        assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "256"
        cmd, _ = systems.server_command(System(name="d", kind=kind), suite.budgets[0], suite, model, tiered, 1, tmp_path)
        assert "--max-num-batched-tokens" not in cmd


def test_extra_memory_moves_one_systems_budget_and_no_other(tmp_path):
    """A comparison at the same measured memory: one system's weights+KV budget moves by
    extra_memory_mb (its KV bytes for plain vLLM, its memory budget and KV for MorphServe);
    a budget that leaves no KV is refused in one line."""
    import pytest

    from morphserve.errors import MorphServeError
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    model, tiered, suite = _one_cell_suite(tmp_path)
    run = lambda system: systems.server_command(system, suite.budgets[0], suite, model, tiered, 1, tmp_path)[0]  # noqa: E731
    value = lambda cmd, flag: float(cmd[cmd.index(flag) + 1])  # noqa: E731
    for kind in ("fp16", "w8a8"):
        base, more = run(System(name="a", kind=kind)), run(System(name="b", kind=kind, extra_memory_mb=-25))
        assert value(base, "--kv-cache-memory-bytes") - value(more, "--kv-cache-memory-bytes") == 25 * 10**6
    base = run(System(name="m", kind="morphserve", policy="default"))
    more = run(System(name="m", kind="morphserve", policy="default", extra_memory_mb=60))
    assert value(more, "--kv-cache-memory-bytes") - value(base, "--kv-cache-memory-bytes") == 60 * 10**6
    assert abs((value(more, "--memory-budget-gb") - value(base, "--memory-budget-gb")) * 2**30 - 60 * 10**6) < 1
    with pytest.raises(MorphServeError, match="does not cover its weights"):
        run(System(name="f", kind="fp16", extra_memory_mb=-400))


def test_a_held_morphserve_system_may_run_without_a_policy(tmp_path):
    """The runtime alone at one rung: no policy loaded, so its per-step work is not in the
    replay. Without a hold there would be nothing to move the level, so that stays an error."""
    from pydantic import ValidationError

    from morphserve.cli.commands import build_parser
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    model, suite, tiered = _fake_model_suite_and_pack(tmp_path)
    cmd, _ = systems.server_command(System(name="bare", kind="morphserve", hold_level=30), suite.budgets[0], suite,
                                    model, tiered, 1, tmp_path)
    serve_args, _ = build_parser().parse_known_args(cmd[cmd.index("morphserve.cli") + 1:])
    assert "--policy" not in cmd and serve_args.policy is None
    cmd, _ = systems.server_command(System(name="d", kind="morphserve", policy="default", hold_level=30),
                                    suite.budgets[0], suite, model, tiered, 1, tmp_path)
    assert cmd[cmd.index("--policy") + 1] == "default"
    with pytest.raises(ValidationError, match="needs a policy"):
        System(name="loose", kind="morphserve")
