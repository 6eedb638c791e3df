"""How long a served prompt takes to its first token, plain vLLM against MorphServe held at
one rung with its heap trimmer set several ways: the prefill cost of the serving path itself.

The evaluation's rows mix arrivals, decodes and queueing, so a few percent of prefill time is
lost in their spread. Here one server at a time gets the same sequence, one request at a
time: a `--prompt-tokens` prompt with one output token (its latency is its first token),
then a short request that decodes `--decode-tokens` tokens, then `--pause` seconds of rest
(long enough for a trimmer tick between two prompts, as between a row's arrivals), repeated
`--prompts` times after a warm-up. A MorphServe server first runs the evaluation's warm-up
transitions (level 30 -> 0), then is held at level 0 (no policy), so only the serving path
and the trimmer differ from plain vLLM. With `--rung w8a8` plain vLLM serves the pack's
static W8A8 checkpoint and MorphServe is held at its ladder's top after the warm-up (all-W8A8
on a W8A8-only pack): the same int8 kernels on both sides. Servers are started the way `morphserve evaluate`
starts them (fp32 where the CPU emulates bf16), one at a time, in alternation for
`--rounds` rounds, so a machine's drift lands on all of them. Each server's process group is
sampled for resident memory (RssAnon + RssFile of every process, as the evaluation counts
it) every 0.2 s; its peak is reported beside the latencies, and MorphServe's trimmer
counters from its state endpoint.

    python scripts/bench_serving_prefill.py --model MODEL_DIR --pack PACK_DIR \\
        --systems plain,trim-0.5,trim-off,trim-grow-64 [--rounds 3] [--prompts 12]
    python scripts/bench_serving_prefill.py --model MODEL_DIR --pack PACK_DIR --rung w8a8 --dtype bfloat16 \\
        --max-model-len 2048 --prompt-tokens 1344 --systems plain,trim-0.5,thread-0.5,trim-off

A system is `plain`, `trim-off`, `trim-S` (every S seconds, at step boundaries: serve's
default mode), `thread-S` (every S seconds from a thread in the worker, also inside a step:
`--heap-trim-mode thread`), `trim-grow-M` (every 0.5 s
once the worker's resident set grew M MiB since its last trim) or `twins-N` (the W8A8 ladder
with prompt twins for N layers, `--prompt-twin-layers N`); a MorphServe system's name
ending in `-cold` skips the warm-up transitions (its layers keep the engine's own loaded
forwards, never restored). Prints, per system, the
median first-token time [min, max] over the rounds (each round's own median over its
prompts), the ratio of medians to plain vLLM's, the same for the short decoding request
(its 48-token prompt and `--decode-tokens` tokens: decode speed), the peak RSS median
[range], and the trims.
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
from morphserve.evaluation.runner import MemorySampler  # noqa: E402
from morphserve.evaluation.systems import static_w8a8_dir  # noqa: E402
from morphserve.harness.servers import free_port, start_server, stop_server  # noqa: E402
from morphserve.vllm.server import PLAIN_VLLM_SERVER  # noqa: E402

KV_BYTES = 161_939_968  # the light AVX2 row's KV space (suite-v4-avx2-tpot04-light, 700 MB in fp32)


def _post(base: str, path: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=60) as r:
        return json.load(r)


def _ids(n: int, salt: int) -> list[int]:
    return [(17 * i + 5 + 31 * salt) % 5000 + 100 for i in range(n)]


def command(system: str, model: str, pack: str, port: int, dtype: str, rung: str = "level0",
            max_model_len: int = 1024) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(VLLM_LOGGING_LEVEL="WARNING")
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
              "--max-num-seqs", "64", "--served-model-name", "model", "--seed", "0", "--dtype", dtype,
              "--enforce-eager", "--kv-cache-memory-bytes", str(KV_BYTES)]
    if system == "plain":
        env["VLLM_PLUGINS"] = ""
        served = str(static_w8a8_dir(Path(pack))) if rung == "w8a8" else model  # the same rung, statically
        return [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", served, "--tokenizer", model, *common], env
    system = system.removesuffix("-cold")
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", model, "--pack", pack, "--manual-min-interval", "0"]
    if system == "trim-off":
        cmd += ["--heap-trim-interval", "0"]
    elif system.startswith("trim-grow-"):
        cmd += ["--heap-trim-interval", "0.5", "--heap-trim-min-growth-mb", system.removeprefix("trim-grow-")]
    elif system.startswith("trim-"):
        cmd += ["--heap-trim-interval", system.removeprefix("trim-")]
    elif system.startswith("thread-"):
        cmd += ["--heap-trim-interval", system.removeprefix("thread-"), "--heap-trim-mode", "thread"]
    elif system.startswith("twins-"):
        cmd += ["--tiers", "w8a8", "--prompt-twin-layers", system.removeprefix("twins-")]
    else:
        raise SystemExit(f"unknown system {system!r}: plain, trim-off, trim-S, thread-S, trim-grow-M or twins-N")
    return cmd + common, env


def run_one(system: str, args, round_no: int, log_dir: Path) -> dict:
    port = free_port()
    cmd, env = command(system, args.model, args.pack, port, args.dtype, args.rung, args.max_model_len)
    proc = start_server(cmd, env, log_dir / f"{system}-r{round_no}.log", port, timeout=600)
    base = f"http://127.0.0.1:{port}"
    try:
        for k in range(3):
            _post(base, "/v1/completions", {"model": "model", "prompt": _ids(64, k), "max_tokens": 8})
        if system != "plain" and not system.endswith("-cold"):  # the evaluation's warm-up, then held
            top = _get(base, "/morphserve/state?memory=0")["max_level"]
            for level in (top, 0) if args.rung == "level0" else (top, 0, top):
                _post(base, "/morphserve/level", {"level": level})
                _post(base, "/v1/completions", {"model": "model", "prompt": _ids(64, 9), "max_tokens": 8})
        firsts, shorts = [], []
        rss = MemorySampler(proc.pid, every=0.2)  # the evaluation's own peak-RSS sampler
        rss.start()
        try:
            for k in range(args.prompts + 1):
                t = time.perf_counter()
                _post(base, "/v1/completions", {"model": "model", "prompt": _ids(args.prompt_tokens, 100 + k),
                                                "max_tokens": 1, "temperature": 0.0})
                if k:  # the first is a warm-up of this length
                    firsts.append(time.perf_counter() - t)
                t = time.perf_counter()
                _post(base, "/v1/completions", {"model": "model", "prompt": _ids(48, 500 + k),
                                                "max_tokens": args.decode_tokens, "temperature": 0.0,
                                                "ignore_eos": True})
                if k:
                    shorts.append(time.perf_counter() - t)
                time.sleep(args.pause)
        finally:
            rss.stop.set()
            rss.join()
        trim = None
        if system != "plain":
            trim = (_get(base, "/morphserve/state").get("memory") or {}).get("heap_trim")
    finally:
        stop_server(proc)
    return {"system": system, "round": round_no, "first_token_s": firsts, "median_s": statistics.median(firsts),
            "short_request_s": shorts, "short_median_s": statistics.median(shorts),
            "peak_rss_mib": rss.peak["total"] / 2**20, "heap_trim": trim}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model directory (the evaluation's)")
    ap.add_argument("--pack", required=True, help="the MorphServe pack directory")
    ap.add_argument("--systems", default="plain,trim-0.5,trim-off", help="comma-separated, run in this order each round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternation (each starts every system once)")
    ap.add_argument("--prompts", type=int, default=12, help="timed prompts per server")
    ap.add_argument("--prompt-tokens", type=int, default=320, help="tokens per timed prompt (the light row's long prompts)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens the short request between prompts decodes")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of rest after each pair of requests")
    ap.add_argument("--dtype", default="float32", help="the servers' --dtype (fp32 where bf16 is emulated)")
    ap.add_argument("--rung", choices=("level0", "w8a8"), default="level0",
                    help="level0: plain vLLM on the model against MorphServe held at level 0; w8a8: plain vLLM "
                         "on the pack's static W8A8 checkpoint against MorphServe held at its top (all-W8A8 on a "
                         "W8A8-only pack)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="every server's --max-model-len")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_serving_prefill"), help="logs and results.json")
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(1, args.rounds + 1):
        for system in systems:
            run = run_one(system, args, r, args.out)
            runs.append(run)
            print(f"round {r} {system}: first token median {run['median_s']:.3f} s, peak RSS "
                  f"{run['peak_rss_mib']:.0f} MiB, trims {run['heap_trim']}", flush=True)
            (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    plain = [x["median_s"] for x in runs if x["system"] == "plain"]
    plain_short = [x["short_median_s"] for x in runs if x["system"] == "plain"]
    print(f"\n| system | first token (s), median [range] of round medians | over plain | {args.decode_tokens}-token "
          "request (s), the same | over plain | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for system in systems:
        mine = [x["median_s"] for x in runs if x["system"] == system]
        short = [x["short_median_s"] for x in runs if x["system"] == system]
        peaks = [x["peak_rss_mib"] for x in runs if x["system"] == system]
        ratio = f"{statistics.median(mine) / statistics.median(plain):.3f}x" if plain else "-"
        short_ratio = f"{statistics.median(short) / statistics.median(plain_short):.3f}x" if plain_short else "-"
        print(f"| {system} | {spread(mine)} | {ratio} | {spread(short)} | {short_ratio} | "
              f"{statistics.median(peaks):.0f} [{min(peaks):.0f}, {max(peaks):.0f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
