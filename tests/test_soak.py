"""A 60-second soak of a real server (scripts/soak.py, whose 10-minute run is in
docs/RESULTS.md): a replayed trace, a random level forced every few seconds, the policy in
between; no failed request, exact output lengths, flat memory, no leaked process.

Short prompts and outputs here: with the trace's long tail of prompt lengths, vLLM's own
worker heap keeps growing for minutes as new activation shapes appear (plain vLLM does the
same, see RESULTS.md), which would hide a leak of MorphServe's in one minute.

The memory bar here is 3.5%, not the 10-minute run's 1%: over one minute the unexplained
anonymous memory (1.1-1.6 GiB, nearly all vLLM's worker) moved +0.25%, +0.32% and +0.41%
in three runs, once past 1% in a full suite, and once +2.67% in a fresh clone's full suite
on a Zen 4 (one +32 MiB step between two checkpoints at level 0; alone on the same machine
+1.06%), so 2.5% tested malloc's noise too. 3.5% is 40-56 MiB; one SmolLM2 decoder layer is
7.1 MB in bf16, and the run makes at least 10 transitions, so leaking even one layer per
transition (the smallest unit MorphServe moves) would be 70 MB or more and still fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.engine_utils import REPO

pytestmark = [pytest.mark.engine, pytest.mark.quant]


def test_one_minute_soak(model_dir, pack_dir, tmp_path, fast_dtype):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "scripts/soak.py", "--model", str(model_dir), "--pack", str(pack_dir),
                           "--duration", "60", "--warmup", "15", "--checkpoint-every", "8", "--force-every", "2",
                           "--max-input", "64", "--max-output", "32", "--dtype", fast_dtype,
                           "--memory-growth-limit", "0.035", "--min-level-events", "8",
                           "--min-transitions", "10",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout, proc.stderr[-2000:])
    assert result["requests"]["completed"] >= 20
    # a level event every 2 s, less the time checkpoints hold level 0: 15+ in the minute on
    # AVX-512 and AMX machines, 9 on a 2-core AVX2 EPYC (bf16 emulated: each checkpoint's
    # restore and drain take longer) and 6 there on one core of it (`make test`'s workers), so
    # the run goes on until it has made 8 (--min-level-events, checked by the script too).
    # Events alone do not promise transitions: a hand-back may find the policy keeping the
    # level held (a CI run made 8 events and only 4 transitions), so the run also goes on
    # until the server has completed 10 (--min-transitions), which the memory bar relies on
    assert result["level_events"]["events"] >= 8
    assert sum(result["transitions_by_direction"].values()) >= 10
