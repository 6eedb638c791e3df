"""scripts/forward_times.py: vLLM's forward-time log line read and compared, as pure logic (no server)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("forward_times", Path(__file__).parent.parent / "scripts/forward_times.py")
ft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ft)


def _log(path: Path, *stats: list) -> Path:
    lines = ["(APIServer pid=1) WARNING something else"]
    for s in stats:
        lines.append(f"(Worker pid=2) INFO 2026-12-01 03:00:00,000 [vllm.forward_context] {ft.MARK} {s!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_last_stats_line_of_a_log_is_read(tmp_path):
    log = _log(tmp_path / "server.log", [(1, 3, 10.0)], [(1, 9, 11.0), (512, 6, 80.5)])
    assert ft.last_stats(log) == {1: (9, 11.0), 512: (6, 80.5)}


def test_a_log_without_the_line_is_a_clear_error(tmp_path):
    (tmp_path / "server.log").write_text("nothing here\n")
    with pytest.raises(ValueError, match="VLLM_LOG_BATCHSIZE_INTERVAL"):
        ft.last_stats(tmp_path / "server.log")


def test_ratios_are_weighted_by_b_and_skip_rare_sizes():
    a = {1: (100, 10.0), 8: (100, 20.0), 300: (2, 50.0)}
    b = {1: (10, 11.0), 8: (90, 20.0), 300: (50, 100.0)}
    assert ft.ratios(a, b, min_count=5) == pytest.approx(1.0)  # size 8 carries 90 of 100 of B's forwards
    assert ft.ratios(a, b, min_count=5, band=(1, 4)) == pytest.approx(1.1)
    assert ft.ratios(a, b, min_count=5, band=(129, 1 << 30)) is None  # A served 300 twice only


def test_totals_sum_the_logged_forwards_beside_the_run():
    stats = {1: (100, 10.0), 500: (4, 200.0)}
    run = {"process_work": {"VLLM::Worker": {"cpu_s": 2.0}}, "vllm_counters": {"step_tokens": 1600, "steps": 110}}
    t = ft.totals(stats, run)
    assert t["forwards"] == 104 and t["forward_s"] == pytest.approx(1.8)
    assert t["steps"] == 110 and t["worker_cpu_s"] == 2.0


def test_the_report_compares_repetitions_pairwise(tmp_path, capsys):
    for system, ms in (("a", 10.0), ("b", 10.5)):
        rep = tmp_path / "w" / "329MB" / system / "rep1"
        rep.mkdir(parents=True)
        _log(rep / "server.log", [(1, 50, ms), (8, 50, 2 * ms)])
        (rep / "run.json").write_text(json.dumps({"process_work": {"VLLM::Worker": {"cpu_s": 2.0}},
                                                  "vllm_counters": {"step_tokens": 400, "steps": 100}}))
    assert ft.main([str(tmp_path), "--window", "w", "--budget", "329MB", "--a", "a", "--b", "b"]) == 0
    out = capsys.readouterr().out
    assert "| b | 1 | 1.050 | 1.050 | - | - |" in out and "| a | 1 | 100 | 100 | 1.5 | 2.0 | 0.750 |" in out


def test_a_run_without_the_line_ends_in_one_error_line(tmp_path, capsys):
    rep = tmp_path / "w" / "329MB" / "a" / "rep1"
    rep.mkdir(parents=True)
    (rep / "server.log").write_text("no stats\n")
    assert ft.main([str(tmp_path), "--window", "w", "--budget", "329MB", "--a", "a", "--b", "a"]) == 2
    assert capsys.readouterr().err.startswith("error:")
