"""scripts/decode_gaps.py: which token gaps count as decode steps, and at what batch (pure logic)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("decode_gaps", Path(__file__).parent.parent / "scripts/decode_gaps.py")
gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gaps)

# A decodes alone, then B's prompt arrives (0.25) and is prefilled until its first token (0.35),
# then both decode until A ends (0.5). A's gaps overlapping B's prompt are not decode steps.
A = {"index": 0, "start_mono": 0.0, "token_offsets_s": [0.1, 0.2, 0.3, 0.4, 0.5]}
B = {"index": 1, "start_mono": 0.25, "token_offsets_s": [0.1, 0.22, 0.36]}


def test_gaps_skip_prompts_in_flight_and_count_the_batch():
    out = gaps.gaps_by_batch([A, B])
    assert sorted(out) == [1, 2]
    assert sorted(out[1]) == pytest.approx([0.1, 0.14])  # A alone before B was sent; B alone after A ended
    assert sorted(out[2]) == pytest.approx([0.1, 0.12])  # A's last gap and B's first, side by side


def test_requests_without_tokens_are_ignored_and_the_batch_is_capped():
    assert gaps.gaps_by_batch([A, B, {"index": 2, "start_mono": 9.0, "token_offsets_s": []}]) == gaps.gaps_by_batch([A, B])
    assert sorted(gaps.gaps_by_batch([A, B], max_batch=1)) == [1]


def test_ratio_is_the_median_over_batch_sizes_both_have():
    a = {1: [0.02] * 3, 2: [0.03] * 3, 3: [0.04]}
    b = {1: [0.03] * 3, 2: [0.03] * 3, 4: [0.09] * 3}
    value, common = gaps.ratio(a, b, min_gaps=2)
    assert common == [1, 2] and value == pytest.approx(1.25)
    assert gaps.ratio(a, b, min_gaps=5) is None


def test_main_refuses_a_folder_without_requests(tmp_path, capsys):
    (tmp_path / "w" / "b" / "x" / "rep1").mkdir(parents=True)
    (tmp_path / "w" / "b" / "x" / "rep1" / "requests.jsonl").write_text(json.dumps(A) + "\n" + json.dumps(B) + "\n")
    assert gaps.main([str(tmp_path), "--window", "w", "--budget", "b", "--a", "x", "--b", "y"]) == 2
    assert "for y" in capsys.readouterr().err
    assert gaps.main([str(tmp_path), "--window", "w", "--budget", "b", "--a", "x", "--b", "x", "--min-gaps", "1"]) == 0
    assert "1.000x" in capsys.readouterr().out


def test_gaps_are_split_by_the_level_served_at_their_middle():
    # the server starts at level 0, is at 30 from 0.32 on (a move through 15), at 33 from 0.46
    moves = [{"from": 0, "to": 30, "levels": [[0.31, 1e9, 15], [0.32, 1e9, 30]]},
             {"from": 30, "to": 33, "levels": [[0.46, 1e9, 33]]}]
    out = gaps.gaps_by_batch_and_level([A, B], moves)
    assert sorted(out) == [(1, 0), (1, 33), (2, 30)]
    assert out[(1, 0)] == pytest.approx([0.1])  # A alone, before B was sent
    assert sorted(out[(2, 30)]) == pytest.approx([0.1, 0.12])
    assert out[(1, 33)] == pytest.approx([0.14])  # B alone after A ended
    # no move at all: every gap at level 0
    assert set(gaps.gaps_by_batch_and_level([A, B], [])) == {(1, 0), (2, 0)}


def test_main_by_level_needs_the_transitions(tmp_path, capsys):
    rep = tmp_path / "w" / "b" / "m" / "rep1"
    rep.mkdir(parents=True)
    (rep / "requests.jsonl").write_text(json.dumps(A) + "\n" + json.dumps(B) + "\n")
    args = [str(tmp_path), "--window", "w", "--budget", "b", "--a", "m", "--b", "m", "--min-gaps", "1",
            "--by-level", "m"]
    assert gaps.main(args) == 2 and "transitions.jsonl" in capsys.readouterr().err
    (rep / "transitions.jsonl").write_text(json.dumps({"from": 0, "to": 30, "levels": [[0.32, 1e9, 30]]}) + "\n")
    assert gaps.main(args) == 0
    out = capsys.readouterr().out
    assert "m, by the level served:" in out and "| level 0 ms (gaps) | level 30 ms (gaps) |" in out
