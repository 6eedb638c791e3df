"""scripts/policy_trace.py is how a speed change to policies/ shows it changed no decision:
its output must be a function of the seed and the code alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from scripts import policy_trace  # noqa: E402


def test_two_runs_of_one_tree_write_the_same_lines(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert policy_trace.main(["--out", str(a), "--scenarios", "4", "--boundaries", "300"]) == 0
    assert policy_trace.main(["--out", str(b), "--scenarios", "4", "--boundaries", "300"]) == 0
    assert a.read_bytes() == b.read_bytes()
    lines = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(lines) == 1200
    # the streams reach more than holding: moves up and restores are what a change could alter
    kinds = {line["reason"].split(":")[0] for line in lines}
    assert {"hold", "speed"} <= kinds, kinds
    assert len({line["target"] for line in lines}) > 2


def test_a_tree_without_policies_is_refused(tmp_path, capsys):
    assert policy_trace.main(["--out", str(tmp_path / "x.jsonl"), "--tree", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
