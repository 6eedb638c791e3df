"""`morphserve policy explain` over hand-written transition logs (plain Python, no engine)."""

from __future__ import annotations

import json

import pytest

from morphserve.errors import MorphServeError
from morphserve.evaluation.explain import explain, reason_kind, render
from tests.conftest import morphserve_cli


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _up(t, a, b, wait=0.0, seconds=0.05, reason="demand 40 blocks (+10%) > capacity 9 at 0 layers",
        wanted=0, after=0):
    return {"time": t, "from": a, "to": b, "reason": reason,
            "signals": {"queue_delay_s": wait, "used_blocks": wanted, "waiting_blocks": 0},
            "seconds": seconds, "kv_blocks_after": after, "levels": [[t + 100.0, t, b]]}


def _down(t, a, b, commit=0.006, steps=2):
    return {"time": t, "from": a, "to": b, "reason": "calm: demand 5 blocks", "signals": {"queue_delay_s": 0.0},
            "seconds": 1.0, "mode": "background", "steps": steps, "commit_seconds": commit,
            "levels": [[t + 100.0, t, b]]}


def test_a_staircase_and_a_jump_are_told_apart(tmp_path):
    log = _write(tmp_path / "t.jsonl", [
        _up(10.0, 0, 4, wait=0.5), _up(11.0, 4, 8), _up(12.0, 8, 12), _down(20.0, 12, 0),
        _up(30.0, 0, 24, wait=0.2), _down(40.0, 24, 0),
    ])
    e = explain(log)
    assert [(b.from_level, b.to_level, b.transitions) for b in e.bursts] == [(0, 12, 3), (0, 24, 1)]
    assert e.bursts[0].response_s == pytest.approx(12.05 - 9.5)
    assert e.bursts[1].response_s == pytest.approx(0.25)
    assert e.by_direction == {"quantize": 4, "restore": 2}
    assert e.reasons[reason_kind("demand 41 blocks (+10%) > capacity 10 at 0 layers")] == 4
    assert e.seconds_at_level == {4: 1.0, 8: 1.0, 12: 8.0, 0: 10.0, 24: 10.0}
    assert [c["commit_seconds"] for c in e.restore_commits] == [0.006, 0.006]
    text = render(e)
    assert "0 -> 12 layers in 3 transition(s), 2.55 s" in text and "6.0 ms over 2 boundaries" in text


def test_the_wait_for_service_ends_at_the_transition_that_covers_the_queue(tmp_path):
    # a staircase: 20 blocks wanted at the first decision, covered only by the third step
    stairs = explain(_write(tmp_path / "s.jsonl", [
        _up(10.0, 0, 2, wait=0.4, wanted=20, after=12), _up(12.0, 2, 4, wanted=20, after=16),
        _up(14.0, 4, 6, wait=1.0, wanted=22, after=21)]))
    assert stairs.service_waits == [pytest.approx(14.05 - 9.6)]  # the third step's own queue is never covered
    jump = explain(_write(tmp_path / "j.jsonl", [_up(10.0, 0, 6, wait=0.4, wanted=20, after=21)]))
    assert jump.service_waits == [pytest.approx(0.45)]


def test_manual_levels_are_not_bursts(tmp_path):
    manual = {"time": 1.0, "from": 0, "to": 30, "reason": "manual", "signals": None, "seconds": 0.05, "levels": []}
    e = explain(_write(tmp_path / "t.jsonl", [manual]))
    assert e.bursts == [] and e.by_direction["quantize"] == 1


def test_tokens_and_perplexity_from_the_requests(tmp_path):
    log = _write(tmp_path / "t.jsonl", [_up(10.0, 0, 30)])  # level 30 from monotonic 110
    rows = [{"ok": True, "start_mono": 100.0, "ttft_s": 1.0, "token_offsets_s": [1.0, 2.0], "input_len": 8,
             "output_len": 2},
            {"ok": True, "start_mono": 109.0, "ttft_s": 2.0, "token_offsets_s": [2.0, 3.0], "input_len": 8,
             "output_len": 2}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    e = explain(log, requests, {0: 10.0, 30: 20.0})
    assert e.tokens_at_level == {0: 10, 30: 10}
    assert e.ppl_increase == pytest.approx((10.0 ** 0.5 * 20.0 ** 0.5) / 10.0 - 1)


def _twinned_run(tmp_path):
    """A server holding 20 prompt twins: its floor (level 5) from t=1, level 30 from t=10, one
    request at each (8 prompt + 2 output tokens); a linear quality curve."""
    from morphserve.runtime.recorder import Recorder

    recorder = Recorder(str(tmp_path / "t.jsonl"), {"prompt_twin_layers": 20})
    recorder.level_changes = [[100.0, 1.0, 5]]  # (monotonic, wall, level), as level_changed records them
    recorder.write({"time": 1.0, "from": 0, "to": 5, "reason": "floor: ...", "seconds": 0.1})
    recorder.level_changes = [[110.0, 10.0, 30]]
    recorder.write(_up(10.0, 5, 30))
    rows = [{"ok": True, "start_mono": 101.0, "ttft_s": 1.0, "token_offsets_s": [1.0, 2.0], "input_len": 8,
             "output_len": 2},
            {"ok": True, "start_mono": 109.0, "ttft_s": 2.0, "token_offsets_s": [2.0, 3.0], "input_len": 8,
             "output_len": 2}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "t.jsonl", requests, rows, {k: 10.0 + k for k in range(31)}


def _pack(tmp_path, curve):
    """A folder holding only the quality.json `explain --pack` reads."""
    pack = tmp_path / "pack"
    pack.mkdir(exist_ok=True)
    (pack / "quality.json").write_text(json.dumps({"orders": {"lis": {"ppl": {str(k): v for k, v in curve.items()}}}}))
    return pack


def test_a_server_with_prompt_twins_is_charged_as_its_ledger_and_the_evaluation_charge_it(tmp_path):
    """Its records carry prompt_twin_layers; every token counts at least that level, the
    figure `evaluate` computes (quality_of_run with the same floor); a flag overrides."""
    from morphserve.evaluation.quality import LevelAt, level_changes, quality_of_run, tokens_by_level

    log, requests, rows, curve = _twinned_run(tmp_path)
    assert all(json.loads(line)["prompt_twin_layers"] == 20 for line in log.read_text().splitlines())
    e = explain(log, requests, curve)
    assert e.charge_floor == 20 and e.tokens_at_level == {5: 10, 30: 10}  # the levels in force
    assert e.ppl_increase == pytest.approx(((10.0 + 20) * (10.0 + 30)) ** 0.5 / 10.0 - 1)  # 5 charged as 20
    assert e.ppl_increase == quality_of_run(rows, curve, level_changes(log), 0, 20)["ppl_increase"]
    assert "charged at least level 20" in render(e) and "an upper bound" in render(e) and not e.ppl_exact
    plain = explain(log, requests, curve, prompt_twin_layers=0)
    assert plain.ppl_increase == pytest.approx(((10.0 + 5) * (10.0 + 30)) ** 0.5 / 10.0 - 1)
    assert tokens_by_level(rows, LevelAt(level_changes(log)))["prompt"] == {5: 8, 30: 8}
    bad = morphserve_cli("policy", "explain", str(log), "--prompt-twin-layers", "-1")
    assert bad.returncode == 2 and "--prompt-twin-layers must be 0 or more" in bad.stderr


def test_the_servers_own_count_charges_only_the_steps_its_twins_computed(tmp_path):
    """--served-tokens: half the tokens served at the floor came from twin steps, so half of
    level 5's are charged at 20 and half at 5, as `evaluate` charges a run from the same count;
    a saved state counts from the server's start, a run.json from its warm-up."""
    from morphserve.cli.policy import served_counts
    from morphserve.evaluation.quality import level_changes, quality_of_run

    log, requests, rows, curve = _twinned_run(tmp_path)
    count = {"by_level": {"5": 14, "30": 10}, "through_twins": {"5": 7, "30": 10}, "twin_min_tokens": 128}
    warm = {"by_level": {"5": 4, "30": 0}, "through_twins": {"5": 2, "30": 0}, "twin_min_tokens": 128}
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"served_by_level": count, "warmup": {"served_by_level": warm}}))
    state = tmp_path / "state.json"  # a server that served only these requests: its count since it started
    since_start = {"by_level": {"5": 10, "30": 10}, "through_twins": {"5": 5, "30": 10}, "twin_min_tokens": 128}
    state.write_text(json.dumps({"level": 30, "served_tokens": since_start}))
    exact = ((10.0 + 20) ** 5 * (10.0 + 5) ** 5 * (10.0 + 30) ** 10) ** (1 / 20) / 10.0 - 1
    for path in (run, state):
        before, after = served_counts(path)
        e = explain(log, requests, curve, served=(before, after))
        assert e.ppl_exact and e.ppl_increase == pytest.approx(exact)
    assert served_counts(run)[0] == warm and served_counts(state) == (None, since_start)
    assert e.ppl_increase == pytest.approx(quality_of_run(rows, curve, level_changes(log), 0, 20,
                                                          {5: 0.5, 30: 1.0})["ppl_increase"])
    assert e.ppl_increase == pytest.approx(quality_of_run(rows, curve, level_changes(log), 0, 20, {5: 0.5, 30: 1.0},
                                                          {5: 10, 30: 10})["ppl_increase"])
    assert "by its own count" in render(e)
    out = morphserve_cli("policy", "explain", str(log), "--requests", str(requests), "--pack", str(_pack(tmp_path, curve)),
                         "--served-tokens", str(state))
    assert out.returncode == 0 and f"{exact:+.2%}" in out.stdout, out.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"level": 3}))
    for bad, message in ((tmp_path / "bad.json", "no served-token count"), (tmp_path / "none.json", "cannot read")):
        err = morphserve_cli("policy", "explain", str(log), "--requests", str(requests), "--pack",
                             str(_pack(tmp_path, curve)), "--served-tokens", str(bad))
        assert err.returncode == 2 and message in err.stderr and "Traceback" not in err.stderr
    err = morphserve_cli("policy", "explain", str(log), "--served-tokens", str(state))
    assert err.returncode == 2 and "--served-tokens needs --pack and --requests" in err.stderr


def test_a_file_that_is_not_a_transition_log_gets_one_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": 1}\nnot json\n')
    with pytest.raises(MorphServeError, match="bad.jsonl:2: not a JSON line"):
        explain(bad)
    (tmp_path / "odd.jsonl").write_text('[1, 2]\n')
    with pytest.raises(MorphServeError, match="not a transition record"):
        explain(tmp_path / "odd.jsonl")


def test_the_cli_refuses_a_missing_log_with_one_line(tmp_path):
    out = morphserve_cli("policy", "explain", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no such transition log" in out.stderr
    log = _write(tmp_path / "t.jsonl", [_up(10.0, 0, 4)])
    lonely = morphserve_cli("policy", "explain", str(log), "--pack", str(tmp_path))
    assert lonely.returncode == 2 and "--pack needs --requests" in lonely.stderr
    ok = morphserve_cli("policy", "explain", str(log), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["bursts"][0]["to_level"] == 4


def test_each_burst_names_its_rung_and_what_decided_it(tmp_path):
    speed = _up(10.0, 0, 12, wait=0.3, reason="speed: demand 30 blocks (+10%) fits 400 at level 12, predicted step "
                                              "0.150s <= 0.160s (levels below are slower than 0.160s)")
    speed["tiers_to"] = {"w8a8": 12}
    capacity = _up(30.0, 0, 40, wait=0.1, reason="capacity: demand 80 blocks (+10%) fits 89 at level 40")
    capacity["tiers_to"] = {"w8a8": 20, "w4a16": 10}
    log = _write(tmp_path / "t.jsonl", [speed, _down(20.0, 12, 0), capacity])
    e = explain(log)
    assert [(b.to_level, b.why, b.tiers) for b in e.bursts] == [
        (12, ["speed"], {"w8a8": 12}), (40, ["capacity"], {"w8a8": 20, "w4a16": 10})]
    text = render(e)
    assert "0 -> 12 layers (w8a8 12) in 1 transition(s), 0.35 s; for speed" in text
    assert "0 -> 40 layers (w4a16 10, w8a8 20) in 1 transition(s), 0.15 s; for capacity" in text
    assert e.reasons == {"speed": 1, "capacity": 1, "calm": 1}
