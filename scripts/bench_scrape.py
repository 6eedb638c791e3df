"""What scraping a MorphServe server costs: the CPU time of every server process while an
idle server is scraped (`/metrics` every `--every` seconds), and the latency of a
`/morphserve/state` read and a `/metrics` scrape.

    .venv/bin/python scripts/bench_scrape.py --model MODEL --pack PACK [--every 5] [--window 60] [--reps 3]

Each repetition starts a fresh `morphserve serve`, waits `--settle` seconds, then reads the
CPU ticks of its process group (/proc/PID/stat utime+stime, every process) before and after
the window. Prints one JSON line per repetition and the medians with their ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness import proc_stat  # noqa: E402
from morphserve.harness.servers import free_port, group_pids, serving  # noqa: E402



def group_cpu_s(pgid: int) -> float:
    stats = (proc_stat.read(pid) for pid in group_pids(pgid))
    return sum(stat.cpu_s for stat in stats if stat is not None)


def get_ms(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return (time.perf_counter() - t) * 1000


def one_rep(args) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", str(args.model), "--pack", str(args.pack),
           "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = Path(args.out) / f"server-{port}.log"
    with serving(cmd, env, log, port, timeout=300, cwd=REPO) as server:
        time.sleep(args.settle)
        idle_before = group_cpu_s(server.proc.pid)
        time.sleep(args.window)
        idle = group_cpu_s(server.proc.pid) - idle_before
        before = group_cpu_s(server.proc.pid)
        start, scrapes = time.monotonic(), 0
        metrics_ms, state_ms = [], []
        while time.monotonic() - start < args.window:
            metrics_ms.append(get_ms(base + "/metrics"))
            state_ms.append(get_ms(base + "/morphserve/state"))
            scrapes += 1
            time.sleep(max(0.0, start + scrapes * args.every - time.monotonic()))
        scraped = group_cpu_s(server.proc.pid) - before
    return {"idle_cpu_s": round(idle, 2), "scraped_cpu_s": round(scraped, 2), "window_s": args.window,
            "every_s": args.every, "scrapes": scrapes, "metrics_ms_median": round(statistics.median(metrics_ms), 2),
            "state_ms_median": round(statistics.median(state_ms), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="full-precision model folder")
    ap.add_argument("--pack", required=True, help="pack written by `morphserve prepare`")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between scrapes (each: /metrics + /morphserve/state)")
    ap.add_argument("--window", type=float, default=60.0, help="seconds of the idle and the scraped windows")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after start-up before measuring")
    ap.add_argument("--reps", type=int, default=3, help="fresh servers, one after another")
    ap.add_argument("--out", default="out/bench_scrape", help="folder for the server logs")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for rep in range(args.reps):
        rows.append(one_rep(args))
        print(json.dumps({"rep": rep + 1, **rows[-1]}), flush=True)
    for key in ("idle_cpu_s", "scraped_cpu_s", "metrics_ms_median", "state_ms_median"):
        values = [r[key] for r in rows]
        print(f"{key}: median {statistics.median(values)} [{min(values)}, {max(values)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
