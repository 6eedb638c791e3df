"""Each tier's kernel probed in a child interpreter, for processes that never run a kernel.

vLLM's API server validates MorphServe's config (and so probes the pack's tiers) but never
computes. The probe's one tiny call through vLLM's kernels would leave oneDNN's JIT code,
its primitive cache and the touched pages of vLLM's kernel library in that process for its
whole life (measured in an API server: +13 MiB anonymous and +13 MiB file-backed, which
the evaluation counts against MorphServe's peak RSS). A child takes that memory with it
when it exits, and a kernel that kills its process outright (a signal, not an exception)
becomes a reason to drop the tier instead of a dead server.

The verdict is kept for the life of this process, keyed by the tiers, the dtype and the
test-only hidden ops: a CPU does not change under a running process, and engines started
one after another in one process (tests, benchmarks) pay the child's start-up once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from morphserve.vllm.kernels import HIDE_OPS_ENV, probe_tier

PREFIX = "MORPHSERVE_PROBE "  # marks the child's verdict lines among vLLM's own output
TIMEOUT_S = 300.0
_verdicts: dict[tuple, dict[str, str | None]] = {}


def probe_tiers_in_child(tiers, dtype: torch.dtype = torch.bfloat16,
                         timeout_s: float = TIMEOUT_S) -> dict[str, str | None]:
    """tier -> None (runs here) or the reason it does not, from a child interpreter."""
    tiers = list(tiers)
    key = (tuple(tiers), str(dtype), os.environ.get(HIDE_OPS_ENV, ""))
    if key not in _verdicts:
        _verdicts[key] = _run_child(tiers, str(dtype).removeprefix("torch."), timeout_s)
    return dict(_verdicts[key])


def _run_child(tiers: list[str], dtype: str, timeout_s: float) -> dict[str, str | None]:
    cmd = [sys.executable, "-m", __name__, dtype, *tiers]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        ended = f"exit status {done.returncode}" if done.returncode >= 0 else f"signal {-done.returncode}"
        out, err = done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        ended = f"no answer within {timeout_s:.0f} s"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = ""
    verdict = parse_verdicts(out)
    last = (err.strip().splitlines() or [""])[-1]
    for tier in tiers:  # the tier being probed when the child ended, and any after it
        verdict.setdefault(tier, f"the probe of vLLM's {tier} kernel ended its process ({ended})"
                                 + (f": {last}" if last else ""))
    return verdict


def parse_verdicts(stdout: str) -> dict[str, str | None]:
    verdict = {}
    for line in stdout.splitlines():
        if line.startswith(PREFIX):
            tier, reason = json.loads(line[len(PREFIX):])
            verdict[str(tier)] = reason
    return verdict


def main(argv: list[str]) -> int:
    dtype, tiers = getattr(torch, argv[0]), argv[1:]
    for tier in tiers:  # one line per tier as it is decided, so a crash names the tier it hit
        print(PREFIX + json.dumps([tier, probe_tier(tier, dtype)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
