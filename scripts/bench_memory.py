"""Measured memory at equal budget: MorphServe against plain FP16 and plain static W4 vLLM.

One run, three fresh servers one after another, on the same model and the same
weights+KV budget:
  - plain FP16 vLLM, KV = budget - bf16 weights (MorphServe not loaded: VLLM_PLUGINS="");
  - plain vLLM serving the pack's static W4 checkpoint, KV = budget - W4 weights;
  - MorphServe with the whole budget, forced to each level 0, L/4, L/2, 3L/4, L in turn.
For every system (and every MorphServe level) the KV pool is filled: enough concurrent
requests (random token ids, ignore_eos) to ask for 1.3x the KV capacity, so every block is
written. RssAnon and RssFile are sampled every 0.2 s over *all* processes of the server
(API server, engine core, workers) and the peaks reported, with the peak KV usage vLLM
reported on /metrics as proof the pool was full.

Then, on the MorphServe server: restore timings (one layer, and 30 -> 0) with the page
cache warm and cold (the model's and the pack's files evicted with posix_fadvise
DONTNEED first), and 100 round trips 0 <-> L with the group's anonymous memory before
and after.

    python scripts/bench_memory.py --model MODEL_DIR --pack PACK_DIR [--budget-mb 329] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from morphserve.runtime.kv_sizing import model_weight_bytes  # noqa: E402
from morphserve.offline.default_model import cache_root  # noqa: E402
from morphserve.harness.servers import free_port, group_rss, start_server, stop_server  # noqa: E402
from morphserve.vllm.kernels import W4A16_ENV  # noqa: E402
from morphserve.vllm.server import PLAIN_VLLM_SERVER  # noqa: E402
from quant_layers.mapped_checkpoint import MappedCheckpoint  # noqa: E402
from quant_layers.twin import index_safetensors  # noqa: E402

PROMPT_TOKENS, OUTPUT_TOKENS = 896, 64


def _http(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _kv_usage(base: str) -> float | None:
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("vllm:kv_cache_usage_perc"):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        return None
    return None


class Sampler:
    """Peak RSS of the server's process group and peak KV usage, every `period` seconds."""

    def __init__(self, pgid: int, base: str, period: float = 0.2):
        self.pgid, self.base, self.period = pgid, base, period
        self.peak = {"rss_anon_bytes": 0, "rss_file_bytes": 0, "total_bytes": 0, "kv_usage": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = group_rss(self.pgid)
            usage = _kv_usage(self.base) or 0.0
            self.peak["rss_anon_bytes"] = max(self.peak["rss_anon_bytes"], rss["rss_anon_bytes"])
            self.peak["rss_file_bytes"] = max(self.peak["rss_file_bytes"], rss["rss_file_bytes"])
            self.peak["total_bytes"] = max(self.peak["total_bytes"], rss["rss_anon_bytes"] + rss["rss_file_bytes"])
            self.peak["kv_usage"] = max(self.peak["kv_usage"], usage)
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fill_kv(base: str, capacity_tokens: int, seed: int) -> dict:
    """Ask for 1.3x the KV capacity at once so the pool is full while the batch runs."""
    n = max(2, -(-int(1.3 * capacity_tokens) // (PROMPT_TOKENS + OUTPUT_TOKENS)))
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(PROMPT_TOKENS)] for _ in range(n)]

    def one(prompt):
        return _http(base + "/v1/completions", {"model": "model", "prompt": prompt, "max_tokens": OUTPUT_TOKENS,
                                                "temperature": 0.0, "ignore_eos": True})

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        done = sum(len(r["choices"][0]["text"]) >= 0 for r in pool.map(one, prompts))
    return {"requests": n, "completed": done, "seconds": time.monotonic() - t0}


def kv_token_bytes(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2  # K and V, bf16


def measure_plain(name: str, model: Path, tokenizer: Path, kv_bytes: int, args, token_bytes: int) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(VLLM_PLUGINS="", VLLM_LOGGING_LEVEL="WARNING", **W4A16_ENV)  # the kernel MorphServe serves
    cmd = [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", str(model),
           "--tokenizer", str(tokenizer), "--kv-cache-memory-bytes", str(kv_bytes), *common_args(args, port)]
    proc = start_server(cmd, env, args.logs / f"{name}.log", port)
    base = f"http://127.0.0.1:{port}"
    try:
        idle = group_rss(proc.pid)
        with Sampler(proc.pid, base) as sampler:
            fill = fill_kv(base, kv_bytes // token_bytes, seed=1)
        return {"system": name, "kv_bytes": kv_bytes, "idle": idle, "peak": sampler.peak, "fill": fill}
    finally:
        stop_server(proc)


def common_args(args, port: int) -> list[str]:
    return ["--port", str(port), "--host", "127.0.0.1", "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", "64", "--enforce-eager", "--served-model-name", "model"]


def _level(base: str, k: int) -> dict:
    return _http(base + "/morphserve/level", {"level": k})


def measure_morphserve(args, bf16: int) -> dict:
    port = free_port()
    budget = int(args.budget_mb * 10**6)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(args.code))
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", str(args.model), "--pack", str(args.pack),
           "--memory-budget-gb", str(budget / 2**30), "--kv-cache-memory-bytes", str(budget - bf16),
           "--manual-min-interval", "0", *common_args(args, port)]  # it times transitions back to back
    proc = start_server(cmd, env, args.logs / "morphserve.log", port)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"system": "morphserve", "code": str(args.code), "levels": []}
    try:
        out["idle"] = group_rss(proc.pid)
        state = _http(base + "/morphserve/state")
        L = state["swappable_layers"]
        for k in sorted({0, L // 4, L // 2, 3 * L // 4, L}):
            state = _level(base, k)
            with Sampler(proc.pid, base) as sampler:
                fill = fill_kv(base, state["kv_capacity_tokens"], seed=1 + k)
            state = _http(base + "/morphserve/state")
            out["levels"].append({"level": k, "kv_capacity_blocks": state["kv_capacity_blocks"],
                                  "kv_capacity_tokens": state["kv_capacity_tokens"], "peak": sampler.peak,
                                  "fill": fill, "memory": state.get("memory")})
            print(f"[bench_memory] morphserve level {k}: peak {sampler.peak['total_bytes'] / 2**20:.0f} MiB, "
                  f"kv usage {sampler.peak['kv_usage']:.2f}", file=sys.stderr, flush=True)
        out["restore"] = restore_timings(base, L, args)
        out["round_trips"] = round_trips(base, proc.pid, L, args.round_trips)
    finally:
        stop_server(proc)
    return out


def restore_timings(base: str, L: int, args) -> dict:
    # Cold means every file a transition reads: the model (bf16 masters), the pack, and the
    # kernel-layout twin cache built from it at start-up.
    twins_dir = cache_root() / "kernel-twins"
    files = MappedCheckpoint({**index_safetensors(args.model), **index_safetensors(args.pack / "quantized"),
                              **{str(f): f for f in twins_dir.glob("*.safetensors")}})
    result = {}
    for cache in ("warm", "cold"):
        one, full, quant = [], [], []
        for _ in range(args.repeats):
            _level(base, 1)
            if cache == "cold":
                files.drop_page_cache()
            one.append(_level(base, 0)["transition"]["worker_seconds"])
            if cache == "cold":
                files.drop_page_cache()
            quant.append(_level(base, L)["transition"]["worker_seconds"])
            if cache == "cold":
                files.drop_page_cache()
            full.append(_level(base, 0)["transition"]["worker_seconds"])
        result[cache] = {"restore_one_layer_ms": 1000 * statistics.median(one),
                         f"quantize_0_to_{L}_ms": 1000 * statistics.median(quant),
                         f"restore_{L}_to_0_ms": 1000 * statistics.median(full),
                         "runs": {"one": one, "quantize_all": quant, "restore_all": full}}
    return result


def round_trips(base: str, pgid: int, L: int, n: int) -> dict:
    for _ in range(3):  # allocator pools warm up
        _level(base, L)
        _level(base, 0)
    before = group_rss(pgid)
    for _ in range(n):
        _level(base, L)
        _level(base, 0)
    after = group_rss(pgid)
    return {"n": n, "anon_before": before["rss_anon_bytes"], "anon_after": after["rss_anon_bytes"],
            "anon_growth": after["rss_anon_bytes"] / before["rss_anon_bytes"] - 1}


def report(results: dict) -> str:
    fp16 = results["fp16"]["peak"]["total_bytes"]
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    budget = results["budget_bytes"]
    rows = ["| system | level | KV tokens | peak KV usage | peak RssAnon (MiB) | RssAnon - budget (MiB) | "
            "peak RssFile (MiB) | peak total (MiB) | vs plain FP16 |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name, level, tokens, peak):
        rows.append(f"| {name} | {level} | {tokens:,} | {peak['kv_usage']:.0%} | {mib(peak['rss_anon_bytes'])} | "
                    f"{mib(peak['rss_anon_bytes'] - budget)} | {mib(peak['rss_file_bytes'])} | "
                    f"{mib(peak['total_bytes'])} | {peak['total_bytes'] / fp16 - 1:+.1%} |")

    for name in ("fp16", "w4"):
        r = results[name]
        row(f"plain {name}", "-", r["kv_bytes"] // results["kv_token_bytes"], r["peak"])
    for lv in results["morphserve"]["levels"]:
        row("MorphServe", lv["level"], lv["kv_capacity_tokens"], lv["peak"])
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="bf16 model folder")
    ap.add_argument("--pack", type=Path, required=True, help="pack from `morphserve prepare` (its quantized/ is the W4 baseline)")
    ap.add_argument("--budget-mb", type=float, default=329, help="weights + KV, in 10^6 bytes (default 329)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5, help="repetitions of each restore timing (median reported)")
    ap.add_argument("--round-trips", type=int, default=100, help="0 <-> L round trips for the leak check")
    ap.add_argument("--systems", default="fp16,w4,morphserve", help="comma-separated subset")
    ap.add_argument("--code", type=Path, default=REPO,
                    help="MorphServe source tree the MorphServe server runs (PYTHONPATH); default this checkout")
    ap.add_argument("--out", type=Path, default=None, help="write every figure here as JSON")
    args = ap.parse_args(argv)
    args.logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_memory.{os.getpid()}"
    args.logs.mkdir(parents=True, exist_ok=True)
    budget = int(args.budget_mb * 10**6)
    bf16 = model_weight_bytes(args.model)
    w4 = model_weight_bytes(args.pack / "quantized")
    token_bytes = kv_token_bytes(args.model)
    results: dict = {"budget_bytes": budget, "bf16_weight_bytes": bf16, "w4_weight_bytes": w4,
                     "kv_token_bytes": token_bytes}
    systems = args.systems.split(",")
    for name in systems:
        print(f"[bench_memory] {name} (server logs in {args.logs})", file=sys.stderr, flush=True)
        if name == "fp16":
            results[name] = measure_plain(name, args.model, args.model, budget - bf16, args, token_bytes)
        elif name == "w4":
            results[name] = measure_plain(name, args.pack / "quantized", args.model, budget - w4, args, token_bytes)
        else:
            results[name] = measure_morphserve(args, bf16)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    if {"fp16", "w4", "morphserve"} <= set(systems):
        print(report(results))
        restore = results["morphserve"]["restore"]
        for cache, r in restore.items():
            print(f"{cache} page cache: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k.endswith("_ms")))
        rt = results["morphserve"]["round_trips"]
        print(f"{rt['n']} round trips 0 <-> L: group RssAnon {rt['anon_before'] / 2**20:.0f} -> "
              f"{rt['anon_after'] / 2**20:.0f} MiB ({rt['anon_growth']:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
