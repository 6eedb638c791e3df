"""scripts/reread_ttft.py: older runs' P95 TTFT read with cut requests' first tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("reread_ttft", Path(__file__).parent.parent / "scripts/reread_ttft.py")
reread_ttft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reread_ttft)


def write_run(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "requests.jsonl").write_text("".join(json.dumps({"index": i, **r}) + "\n" for i, r in enumerate(rows)))


def test_an_old_runs_cut_request_counts_its_first_streamed_token(tmp_path, capsys):
    done = [{"ok": True, "ttft_s": float(t), "token_offsets_s": [float(t)]} for t in range(1, 11)]
    # as recorded before the fix: ttft_s None for a failed request, its first token in the offsets
    cut_after = {"ok": False, "ttft_s": None, "token_offsets_s": [30.0, 30.5]}
    cut_before = {"ok": False, "ttft_s": None, "token_offsets_s": None}
    write_run(tmp_path / "w" / "b" / "x" / "rep1", done + [cut_after])
    write_run(tmp_path / "w" / "b" / "x" / "rep2", done + [cut_before])
    assert reread_ttft.main([str(tmp_path), "--window", "w", "--budget", "b"]) == 0
    out = capsys.readouterr().out
    assert "x: P95 TTFT (s) as run inf [inf, inf], with first tokens inf [30.00, inf] (30.00, inf)" in out


def test_nothing_saved_is_an_error(tmp_path, capsys):
    assert reread_ttft.main([str(tmp_path), "--window", "w", "--budget", "b"]) == 2
    assert "error: no saved requests.jsonl" in capsys.readouterr().err
