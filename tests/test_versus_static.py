"""The leading table's rules: MorphServe against each row's best static system (pure
logic over report cells, no server)."""

from morphserve.evaluation.versus_static import best_static, compare_cell, violations_verdict

KINDS = {"fp16": "fp16", "w8a8": "w8a8", "w8a8-fp8kv": "w8a8", "w4": "w4", "ms": "morphserve"}


def s(median, low=None, high=None):
    return {"median": median, "low": median if low is None else low, "high": median if high is None else high,
            "n": 3}


def row(violations, ttft, ppl=0.0, rss=2600.0, ttft_p50=None):
    v = violations if isinstance(violations, dict) else s(violations)
    return {"slo_violations": v, "ttft_p95": s(ttft), "ppl_increase": s(ppl), "peak_rss_total_mib": s(rss),
            "ttft_p50": s(ttft if ttft_p50 is None else ttft_p50)}


def cell(regime="capacity", **systems):
    return {"window": "w", "budget": "329MB", "regime": regime, "kinds": KINDS, "systems": systems}


def test_the_best_static_system_has_the_fewest_violations_then_the_lower_ttft():
    systems = {"fp16": row(40, 9.0), "w8a8": row(3, 1.4), "w8a8-fp8kv": row(3, 1.1), "w4": row(5, 0.9),
               "ms": row(0, 0.5)}
    assert best_static(systems, KINDS) == "w8a8-fp8kv"  # MorphServe is never its own rival
    assert best_static({"ms": row(0, 0.5)}, KINDS) is None


def test_violations_are_met_when_no_higher_or_inside_both_ranges():
    assert violations_verdict(s(4), s(4)) == "yes"
    assert violations_verdict(s(69, 47, 71), s(51, 48, 69)) == "tie"  # each median inside the other's range
    assert violations_verdict(s(69, 60, 71), s(51, 48, 55)) == "no"  # 51 is outside [60, 71]
    assert violations_verdict(s(9, 2, 12), s(3, 0, 4)) == "no"  # 9 is outside [0, 4]


def test_a_row_meets_every_rule_or_says_which_it_misses():
    fp16, w8 = row(30, 8.0, ppl=0.0, rss=2640), row(2, 1.2, ppl=0.029, rss=2790)
    [won] = compare_cell(cell(fp16=fp16, w8a8=w8, ms=row(1, 1.4, ppl=0.02, rss=2630)))
    assert won["best_static"] == "w8a8" and won["all_met"]
    assert won["violations"]["met"] == "yes" and abs(won["ttft_p95"]["ratio"] - 1.4 / 1.2) < 1e-9
    [slow] = compare_cell(cell(fp16=fp16, w8a8=w8, ms=row(1, 1.6, ppl=0.02, rss=2630)))
    assert slow["ttft_p95"]["met"] is False and not slow["all_met"]  # 1.33x > 1.25x
    [costly] = compare_cell(cell(fp16=fp16, w8a8=w8, ms=row(1, 1.2, ppl=0.03, rss=2630)))
    assert costly["quality"]["met"] is False and not costly["all_met"]
    [heavy] = compare_cell(cell(fp16=fp16, w8a8=w8, ms=row(1, 1.2, ppl=0.02, rss=2700)))
    assert heavy["memory"]["met"] is False and not heavy["all_met"]  # above FP16's RSS, though below W8A8's


def test_a_capacity_beyond_row_needs_half_the_violations_at_a_third_of_w4s_quality_loss():
    systems = dict(fp16=row(50, 20.0), w8a8=row(40, 9.0, ppl=0.029), w4=row(20, 3.0, ppl=0.20))
    [half] = compare_cell(cell("capacity-beyond", **systems, ms=row(10, 3.0, ppl=0.025)))
    assert half["best_static"] == "w4" and half["beyond"]["violations_met"] and half["beyond"]["quality_met"]
    assert half["all_met"]
    [not_half] = compare_cell(cell("capacity-beyond", **systems, ms=row(12, 3.0, ppl=0.025)))
    assert not_half["violations"]["met"] == "yes" and not not_half["beyond"]["violations_met"]
    assert not not_half["all_met"]
    [plain] = compare_cell(cell("capacity", **systems, ms=row(12, 3.0, ppl=0.025)))
    assert "beyond" not in plain and plain["all_met"]  # the extra rule is for capacity-beyond rows only


def test_infinite_p95_ttft_on_both_sides_is_marked_vacuous_with_the_medians():
    """On an overloaded row both P95 TTFTs are infinite: the rule holds (inf <= 1.25 x inf)
    but says nothing, so the table says so instead of a bare "yes" (it printed "nanx: yes")."""
    from morphserve.evaluation.render import versus_static_table

    inf = float("inf")
    [e] = compare_cell(cell("compute", fp16=row(46, inf, ttft_p50=119.0), w8a8=row(50, inf, ppl=0.012),
                            ms=row(44, inf, ppl=0.004, rss=2500, ttft_p50=57.0)))
    assert e["ttft_p95"]["met"] is True and e["ttft_p95"]["vacuous"] and e["ttft_p95"]["ratio"] is None
    assert e["ttft_p95"]["p50"] == {"morphserve": 57.0, "best_static": 119.0}
    table = versus_static_table([e])
    assert "vacuous, both ∞ (median TTFT 57.00 / 119.00 s)" in table and "nan" not in table
    [finite] = compare_cell(cell("compute", fp16=row(46, 9.0), ms=row(44, inf)))
    assert finite["ttft_p95"]["met"] is False and "vacuous" not in finite["ttft_p95"]


def test_a_capacity_beyond_row_without_a_w4a16_system_skips_only_the_w4a16_quality_half():
    """Where the CPU has no W4A16 kernel (AVX2) no static W4A16 runs: a third of its loss is
    "n/a", not a failure; the half-the-violations half still counts."""
    systems = dict(fp16=row(41, 38.0), w8a8=row(50, float("inf"), ppl=0.012))
    [won] = compare_cell(cell("capacity-beyond", **systems, ms=row(15, 3.0, ppl=0.004, rss=2500)))
    assert won["beyond"]["quality_met"] == "n/a" and won["beyond"]["violations_met"] and won["all_met"]
    [lost] = compare_cell(cell("capacity-beyond", **systems, ms=row(30, 3.0, ppl=0.004, rss=2500)))
    assert lost["beyond"]["violations_met"] is False and not lost["all_met"]


def test_a_suite_with_two_morphserve_systems_names_each_in_the_leading_table():
    """dev-avx2-policy-cost ran MorphServe held at level 0 beside MorphServe with its policy:
    the leading table printed two rows that differed in nothing but their numbers."""
    from morphserve.evaluation.render import versus_static_table

    [e] = compare_cell(cell("compute", fp16=row(46, 9.0), ms=row(44, 9.0)))
    held = {**e, "system": "morphserve-held0"}
    table = versus_static_table([e, held])
    header, rule, *rows = table.splitlines()
    assert header.startswith("| MorphServe system | window |") and rule.count("---") == 11
    assert rows[0].startswith("| ms | w | 329MB | compute |")
    assert rows[1].startswith("| morphserve-held0 |")
    assert not versus_static_table([e]).startswith("| MorphServe system")  # one system: as before


def test_a_suite_without_static_w8a8_leaves_its_rows_not_judged_rather_than_lost():
    from morphserve.evaluation.render import versus_static_table

    fp16 = row(30, 8.0, ppl=0.0, rss=2640)
    [open_row] = compare_cell(cell(fp16=fp16, ms=row(28, 7.5, ppl=0.01, rss=2600)))
    assert open_row["quality"]["met"] == "n/a" and open_row["all_met"] is None
    assert "not judged (no static W8A8" in versus_static_table([open_row])
    [lost] = compare_cell(cell(fp16=fp16, ms=row(40, 7.5, ppl=0.01, rss=2600)))  # violations lost anyway
    assert lost["all_met"] is False and "| **no** |" in versus_static_table([lost])
