"""Engine-thread time of one MorphServe state read: the engine core's `morphserve_state`
utility, called in-process (the work a `/morphserve/state` read or a `/metrics` scrape puts
on the engine's thread), median over `--reads` reads, with and without the memory figures.

    .venv/bin/python scripts/bench_state_read.py MODEL PACK [--reads 50]

Prints one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="full-precision model folder")
    ap.add_argument("pack", help="pack written by `morphserve prepare`")
    ap.add_argument("--reads", type=int, default=50, help="reads per measurement")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from morphserve.vllm.offline_engine import engine_core_of, in_process_llm

    core = engine_core_of(in_process_llm(args.model, args.pack, twin="pack", max_model_len=1024))
    core.morphserve_state()  # the first reading
    out = {}
    for name, kw in (("state", {}), ("state_no_memory", {"memory": False})):
        times = []
        for _ in range(args.reads):
            t = time.perf_counter()
            core.morphserve_state(**kw)
            times.append((time.perf_counter() - t) * 1e6)
        out[f"{name}_us_median"] = round(statistics.median(times), 1)
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # vLLM 0.32's CPU engine teardown can abort in C++; the result is printed


if __name__ == "__main__":
    main()
