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
one after another in one process (tests, benchmarks) pay the child's start-up once. A
verdict that every tier runs is also kept in the cache folder (`kernel-probes/`), keyed as
well by this CPU's model and flags, torch's version and vLLM's kernel libraries (name, size,
modification time): the same machine and build answer the same, and the child interpreter
costs every server start about 10 s on a 2-vCPU machine. A verdict with a tier that does
not run is never kept (a timeout under load must not drop a tier for good), and a wrong
"runs" cannot take a server down: every compute is proved on a tiny input before it is
installed (quant_layers.swappable.prove_compute).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from morphserve.vllm.kernels import HIDE_OPS_ENV, probe_tier
from quant_layers.cache_dir import cache_root
from quant_layers.cpu_kind import this_cpu

PREFIX = "MORPHSERVE_PROBE "  # marks the child's verdict lines among vLLM's own output
TIMEOUT_S = 300.0
_verdicts: dict[tuple, dict[str, str | None]] = {}


def probe_tiers_in_child(tiers, dtype: torch.dtype = torch.bfloat16,
                         timeout_s: float = TIMEOUT_S) -> dict[str, str | None]:
    """tier -> None (runs here) or the reason it does not, from a child interpreter."""
    tiers = list(tiers)
    key = (tuple(tiers), str(dtype), os.environ.get(HIDE_OPS_ENV, ""))
    if key not in _verdicts:
        kept = _kept_path(key)
        try:
            _verdicts[key] = json.loads(kept.read_text())
        except (OSError, ValueError):
            _verdicts[key] = _run_child(tiers, str(dtype).removeprefix("torch."), timeout_s)
            if all(reason is None for reason in _verdicts[key].values()):
                _keep(kept, _verdicts[key])
    return dict(_verdicts[key])


def _kept_path(key: tuple) -> Path:
    """Where a verdict for `key` on this machine and build is kept."""
    vllm_dir = Path(importlib.util.find_spec("vllm").origin).parent
    libraries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in vllm_dir.glob("_C*.so"))
    cpu = this_cpu()
    # "w4a16-pinned": verdicts kept before every probe ran the pinned W4A16 kernel are not reused
    identity = json.dumps([list(key), cpu.model, sorted(cpu.flags), torch.__version__, libraries, "w4a16-pinned"])
    return cache_root() / "kernel-probes" / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"


def _keep(path: Path, verdict: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdict))
        tmp.replace(path)  # a reader never sees half a file
    except OSError:  # a read-only cache costs the next start a probe, nothing else
        pass


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
