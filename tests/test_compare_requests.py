"""scripts/compare_requests.py: request-by-request ratios, pooled and per repetition."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_requests",
                                              Path(__file__).parent.parent / "scripts/compare_requests.py")
compare_requests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_requests)


def write_run(folder: Path, tpots: list[float], ok: list[bool] | None = None) -> None:
    folder.mkdir(parents=True)
    rows = [{"index": i, "ok": True if ok is None else ok[i], "tpot_s": t, "ttft_s": 1.0} for i, t in enumerate(tpots)]
    (folder / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_repetition_gets_its_own_median_and_failed_requests_are_left_out(tmp_path, capsys):
    base = tmp_path / "w" / "b"
    write_run(base / "a" / "rep1", [1.0, 1.0, 1.0])
    write_run(base / "b" / "rep1", [1.1, 1.1, 9.0], ok=[True, True, False])  # the failed one is not compared
    write_run(base / "a" / "rep2", [1.0, 2.0, 1.0])
    write_run(base / "b" / "rep2", [1.3, 2.6, 1.3])
    assert compare_requests.main([str(tmp_path), "--window", "w", "--budget", "b", "--a", "a", "--b", "b"]) == 0
    tpot = next(line for line in capsys.readouterr().out.splitlines() if "TPOT" in line)
    assert "over 5 requests" in tpot
    assert "per repetition 1.100x, 1.300x (median 1.200x [1.100, 1.300])" in tpot


def test_no_shared_repetition_is_an_error(tmp_path, capsys):
    write_run(tmp_path / "w" / "b" / "a" / "rep1", [1.0])
    assert compare_requests.main([str(tmp_path), "--window", "w", "--budget", "b", "--a", "a", "--b", "b"]) == 2
    assert "error: no repetition" in capsys.readouterr().err
