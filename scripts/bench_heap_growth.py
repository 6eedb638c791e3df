"""Where a server's worker memory sits, idle and after a mix of prompt lengths: plain FP16
vLLM against MorphServe held at one level, with its heap trimmer off, trimming every
interval (the default), and gated on 32 MiB of growth (`--heap-trim-min-growth-mb 32`).

Each system is a fresh server started as `morphserve evaluate` starts it (same budget,
limits and flags), MorphServe without a policy so the level stays where it is put. After
six short warm-up requests the worker's memory is read from /proc/PID/smaps (the heap, the
other anonymous mappings, the largest of them: a KV cache is one), then again after each of
two loads of 48 requests (random token ids, 50-900 tokens each, 48 output tokens, 8 at
a time; the second load uses new lengths). No repetition: this places memory, it times
nothing.

    python scripts/bench_heap_growth.py --model MODEL_DIR --pack PACK_DIR [--budget-mb 329]
        [--level 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from morphserve.evaluation.suite import Budget, Suite, System, Window  # noqa: E402
from morphserve.evaluation.systems import server_command  # noqa: E402
from morphserve.harness.servers import free_port, group_pids, start_server, stop_server  # noqa: E402
from morphserve.runtime.proc_memory import process_breakdown, process_rss  # noqa: E402

MIB = 2**20


def _http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _complete(base: str, prompt, max_tokens: int) -> None:
    _http(base + "/v1/completions", {"model": "model", "prompt": prompt, "max_tokens": max_tokens,
                                     "temperature": 0.0, "ignore_eos": True})


def load(base: str, seed: int, n: int = 48) -> None:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(rng.randint(50, 900))] for _ in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _complete(base, p, 48), prompts))


def worker_memory(pgid: int) -> dict:
    for pid in group_pids(pgid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "VLLM::Worker":
                continue
            parts, rss = process_breakdown(pid), process_rss(pid)
        except OSError:
            continue
        return {"anon_mib": rss["rss_anon_bytes"] / MIB, "heap_mib": parts["heap"] / MIB,
                "anon_mappings_mib": parts["anon_mappings"] / MIB,
                "largest_anon_mib": [[s / MIB, r / MIB] for s, r in parts["largest_anon"][:3]]}
    raise RuntimeError("no VLLM::Worker process in the server's group")


def measure(name: str, cmd: list[str], env: dict, logs: Path, level: int | None) -> list[dict]:
    port = free_port()
    cmd = [a if a != "__PORT__" else str(port) for a in cmd]
    proc = start_server(cmd, env, logs / f"{name}.log", port)
    base = f"http://127.0.0.1:{port}"
    rows = []

    def read(point: str) -> None:
        time.sleep(2)  # a trimmer interval or four, and the last request's buffers freed
        rows.append({"system": name, "point": point, **worker_memory(proc.pid)})

    try:
        for i in range(6):
            _complete(base, f"Tell me a story about item {i}. " * 20, 32)
        if level is not None:
            _http(base + "/morphserve/level", {"level": level})
            for i in range(6):
                _complete(base, f"Tell me a story about item {i}. " * 20, 32)
        read("idle after warm-up")
        for seed in (1, 2):
            load(base, seed)
            read(f"after load {seed}")
    finally:
        stop_server(proc)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the bf16 model folder")
    ap.add_argument("--pack", type=Path, required=True, help="a tiered pack of that model (morphserve prepare)")
    ap.add_argument("--budget-mb", type=float, default=329, help="weights + KV budget, 10^6 bytes")
    ap.add_argument("--level", type=int, default=30, help="the level MorphServe is held at (30: all-W8A8 on SmolLM2)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="every server's --dtype (float32 where the CPU emulates bf16)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/bench_heap_growth"), help="server logs")
    args = ap.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    suite = Suite(name="heap", windows=[Window(name="none", trace="azure-conv", start_s=0, duration_s=60,
                                               rate_scale=1, length_scale=1, output_scale=1, regime="light",
                                               why="placeholder: no trace is replayed")],
                  budgets=[Budget(name="b", total_mb=args.budget_mb)], systems=[System(name="fp16", kind="fp16")],
                  static_quantized=None, max_model_len=2048, max_num_seqs=64, dtype=args.dtype)
    systems = [("fp16", System(name="fp16", kind="fp16"), [], None),
               ("morphserve, trimmer off", System(name="morphserve", kind="morphserve", policy="default"),
                ["--heap-trim-interval", "0"], args.level),
               ("morphserve, trimmer every interval (default)",
                System(name="morphserve", kind="morphserve", policy="default"), [], args.level),
               ("morphserve, trimmer gated on 32 MiB of growth",
                System(name="morphserve", kind="morphserve", policy="default"),
                ["--heap-trim-min-growth-mb", "32"], args.level)]
    rows = []
    for name, system, extra, level in tqdm(systems, desc="servers", unit="server"):
        cmd, env = server_command(system, suite.budgets[0], suite, args.model, args.pack, 0, args.logs)
        cmd[cmd.index("--port") + 1] = "__PORT__"
        if "--policy" in cmd:  # held at one level: no policy moves it
            i = cmd.index("--policy")
            del cmd[i:i + 2]
        rows += measure(name, cmd + extra, env, args.logs, level)
    print("| system | point | worker anonymous (MiB) | worker heap (MiB) | other anonymous mappings (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['point']} | {r['anon_mib']:.0f} | {r['heap_mib']:.0f} | {r['anon_mappings_mib']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
