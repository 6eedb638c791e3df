"""The closed loop on a real server, and what a decision costs.

    python scripts/bench_policy.py --model MODEL_DIR --pack PACK_DIR [--policy default] [--dtype float32] [--out result.json]

1. decide() alone, for each preset, on synthetic signals (pure Python, many calls);
2. a `morphserve serve` server (its pack's rungs) under a tight budget (weights in --dtype
   + --fp16-blocks KV blocks) receives a burst of --burst streamed requests (TTFT and
   latency each); we print the transitions from the JSONL log, the morphserve_* lines of
   /metrics, and the live decision cost (sampling the scheduler + decide) against the
   engine's step time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import timeit
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.harness.kv_shape import kv_block_bytes  # noqa: E402
from morphserve.harness.servers import ServerStartError, free_port, serving  # noqa: E402
from morphserve.offline.datafiles import wikitext  # noqa: E402


def decide_cost() -> dict:
    from policies import PolicyState, SignalTracker, StepSample, load_policy, make_policy
    from policies.config import PRESETS

    capacity = list(range(9, 70, 2))[:31]
    out = {}
    for name in PRESETS:
        cfg, _ = load_policy(name)
        policy = make_policy(cfg.model_copy(update={"max_ppl_increase": None}), capacity, 30)
        tracker = SignalTracker(cfg.window_s)
        signals = tracker.add(StepSample(time=1.0, waiting=5, oldest_wait_s=0.05, running=3, used_blocks=8,
                                         capacity_blocks=9, waiting_blocks=15, remaining_tokens=40))
        n = 20000
        out[name] = timeit.timeit(lambda: policy.decide(signals, PolicyState(level=4)), number=n) / n * 1e6
    return out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def _complete(base: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(time to the first streamed token, time to the last), in seconds: streamed, as a chat
    client reads it, so the first burst's TTFT is measured and not only its latency."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:  # server-sent events: one "data: {...}" line per chunk, then "data: [DONE]"
            if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (first if first is not None else total), total


def live(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_policy-"))
    log, port = tmp / "transitions.jsonl", free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", args.model, "--pack", args.pack, "--policy", args.policy,
           "--transition-log", str(log), "--port", str(port), "--max-model-len", "1024", "--max-num-seqs", "32",
           "--kv-cache-memory-bytes", str(args.fp16_blocks * kv_block_bytes(args.model, args.dtype)),
           "--dtype", args.dtype]
    try:
        with serving(cmd, env, tmp / "server.log", port, timeout=300, cwd=REPO) as server:
            return _burst(args, server.url, log)
    except ServerStartError as e:  # the message has the log's tail
        raise SystemExit(str(e)) from None


def _burst(args, base: str, log: Path) -> dict:
    """Send the burst, wait for the full restore; the state, metrics and transitions."""
    text = wikitext("valid").read_text()
    prompts = [text[i * 5000:i * 5000 + 1300] for i in range(args.burst)]
    t0 = time.time()
    with ThreadPoolExecutor(args.burst) as pool:
        timings = list(pool.map(lambda p: _complete(base, p, 60), prompts))
    burst_s = time.time() - t0
    for _ in range(120):
        state = json.loads(_get(base + "/morphserve/state"))
        if state["quantized_layers"] == 0 and state["pending_level"] is None:
            break
        time.sleep(0.5)
    metrics = [ln for ln in _get(base + "/metrics").decode().splitlines()
               if ln.startswith("morphserve_") and "_bucket" not in ln]
    records = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return {"burst_seconds": burst_s, "ttfts": [t for t, _ in timings], "latencies": [t for _, t in timings],
            "state": state, "metrics": metrics,
            "transitions": [{"t": round(r["time"] - t0, 2), "from": r["from"], "to": r["to"],
                             "kv_blocks": [r.get("kv_blocks_before"), r.get("kv_blocks_after")],
                             "seconds": round(r["seconds"], 3), "reason": r["reason"], "outcome": r.get("outcome")}
                            for r in records if "from" in r]}  # a failed move's record has no from: it moved nothing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--policy", default="default", help="preset or YAML file")
    ap.add_argument("--burst", type=int, default=16, help="concurrent requests in the burst")
    ap.add_argument("--fp16-blocks", type=int, default=10, help="KV blocks at full precision (sets the budget)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the server's dtype (float32 where the CPU has no native bf16)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cost = decide_cost()
    print("decide() alone, microseconds per call: " + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()))
    result = live(args)
    s = result["state"]
    ttfts, latencies = sorted(result["ttfts"]), result["latencies"]
    print(f"burst of {args.burst} requests served in {result['burst_seconds']:.1f} s; policy {s['policy']}; "
          f"TTFT median {ttfts[len(ttfts) // 2]:.1f} s, max {ttfts[-1]:.1f} s; mean latency "
          f"{sum(latencies) / len(latencies):.1f} s")
    for t in result["transitions"]:
        print(f"  t={t['t']:>6}s  {t['from']:>2} -> {t['to']:>2} layers, KV blocks {t['kv_blocks'][0]} -> "
              f"{t['kv_blocks'][1]}, {t['seconds'] * 1000:.0f} ms: {t['reason']}")
    d = s["decision_us"]
    step = d.get("step_p50_us") or 0
    print(f"live decision (sample scheduler + decide): p50 {d['p50']:.0f} us, p99 {d['p99']:.0f} us over {d['n']} "
          f"boundaries; median step while serving {step / 1000:.1f} ms"
          + (f" -> decision = {d['p50'] / step:.2%} of a step" if step else ""))
    print("\n".join(result["metrics"]))
    if args.out:
        args.out.write_text(json.dumps({"decide_us": cost, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
