"""`morphserve replay`: replay a bursty trace against a running server with vLLM's own
load generator (`vllm bench serve --dataset-name timed_trace`), then write
DIR/summary.json, DIR/requests.jsonl and DIR/timeline.png.

Works against any OpenAI-compatible vLLM server (plain vLLM too). When the server runs
MorphServe, /morphserve/state is polled during the replay for the timeline's quantized
layers and KV capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from morphserve.replay import stats as replay_stats, trace
from morphserve.offline.datafiles import traces_dir
from morphserve.errors import MorphServeError



def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay an Azure LLM trace (or timed_trace JSONL) against a server",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", required=True, metavar="azure-code|azure-conv|PATH",
                   help="a named Azure LLM 2023 trace or a CSV/JSONL file (timestamp, input_length, output_length)")
    p.add_argument("--window", default="0:60", metavar="START:DURATION", help="seconds of the trace to replay")
    p.add_argument("--timestamp-unit", choices=tuple(trace.TIMESTAMP_UNITS), default="s",
                   help="unit of a JSONL trace's timestamps (Mooncake traces: ms); the Azure CSVs carry dates")
    p.add_argument("--hash-block-size", type=int, default=None, metavar="TOKENS",
                   help="tokens per hash id of a JSONL trace that carries hash_ids (default: 512, Mooncake's); "
                        "traces without ids get fresh ids of 16 tokens")
    p.add_argument("--rate-scale", type=float, default=1.0, help="keep this fraction of requests, evenly (timing kept)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply input lengths by this")
    p.add_argument("--output-scale", type=float, default=None, help="multiply output lengths by this (default: --length-scale)")
    p.add_argument("--max-input", type=int, default=None, help="cap input lengths (the server's max-model-len minus outputs)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    # SUPPRESS, not the variable's value: the defaults formatter would print the key in --help.
    p.add_argument("--api-key", default=argparse.SUPPRESS,
                   help="bearer token, if the server wants one (default: $VLLM_API_KEY if set)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where results go")
    p.add_argument("--slo-ttft", type=float, default=2.0, metavar="S", help="TTFT SLO in seconds (the paper's)")
    p.add_argument("--slo-tpot", type=float, default=0.2, metavar="S", help="TPOT SLO in seconds")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the served model id, if it is a path)")
    p.add_argument("--system", default=None, help="label for summary.json (default: the server's model and state)")
    p.add_argument("--seed", type=int, default=0, help="seed of the load generator and of each request's sampling")
    p.add_argument("--no-plot", action="store_true", help="skip timeline.png")
    p.set_defaults(func=run)


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else $VLLM_API_KEY, read at run time so the key never becomes a parser default."""
    return getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY") or None


def _get(url: str, key: str | None, timeout: float = 10):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class StatePoller(threading.Thread):
    def __init__(self, url: str, key: str | None, every: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.key, self.every = url, key, every
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                # no worker call, and only the figures kept: the engine answers between two steps
                s = _get(self.url + "/morphserve/state?brief=1", self.key, timeout=5)
                self.samples.append({"t": time.time(), "mono": time.perf_counter(),
                                     "quantized_layers": s["quantized_layers"],
                                     "kv_capacity_blocks": s["kv_capacity_blocks"],
                                     "admission_cap": s.get("admission_cap"),
                                     "token_budget": s.get("token_budget")})
            except Exception:  # plain vLLM has no such route; a busy server may be slow
                pass
            self.stop.wait(self.every)


def run(args: argparse.Namespace) -> int:
    args.api_key = api_key(args)
    reqs = trace.load_window(args.trace, traces_dir(), args.timestamp_unit, trace.parse_window(args.window),
                             args.rate_scale, args.length_scale, args.output_scale, args.max_input)
    block = trace.hash_block_size(reqs, args.hash_block_size)
    args.out.mkdir(parents=True, exist_ok=True)
    trace_file = args.out / "trace.jsonl"
    trace.write_timed_trace(reqs, trace_file, block)
    try:
        model = _get(args.url + "/v1/models", args.api_key)["data"][0]["id"]
    except Exception as e:
        raise MorphServeError(f"no vLLM server answering at {args.url}: {e}") from None
    cmd = [sys.executable, "-m", "morphserve.vllm.bench", "serve", "--backend", "vllm", "--base-url", args.url,
           "--model", model, "--tokenizer", args.tokenizer or model, "--dataset-name", "timed_trace", "--dataset-path", str(trace_file),
           "--num-prompts", str(len(reqs)), "--save-result", "--save-detailed", "--result-dir", str(args.out),
           "--result-filename", "bench.json", "--goodput", f"ttft:{args.slo_ttft * 1000}", f"tpot:{args.slo_tpot * 1000}",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95,99",
           "--timed-trace-chunk-hash-size", str(block),
           # equal work: greedy decoding (timed_trace already forces ignore_eos, so every
           # request generates exactly the trace's output length), a fixed seed, and no
           # ready-check request (it would put the first prompt in the prefix cache)
           "--temperature", "0", "--seed", str(args.seed), "--ready-check-timeout-sec", "0"]
    # vLLM's timed_trace seeds each prompt chunk with Python's hash(): fix the seed so every
    # system sees the same prompts.
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
    if args.api_key:
        env["OPENAI_API_KEY"] = args.api_key
    print(f"replaying {len(reqs)} requests from {args.trace} window {args.window} against {args.url}", file=sys.stderr)
    poller = StatePoller(args.url, args.api_key)
    t0 = time.time()
    poller.start()
    with open(args.out / "bench.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    poller.stop.set()
    if rc != 0 or not (args.out / "bench.json").exists():
        raise MorphServeError(f"vllm bench serve failed (exit {rc}); see {args.out / 'bench.log'}")
    bench = json.loads((args.out / "bench.json").read_text())
    rows = replay_stats.per_request(bench, [r.timestamp for r in reqs])
    with open(args.out / "requests.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    system = args.system or model
    summary = replay_stats.summarize(system, rows, bench["duration"], args.slo_ttft, args.slo_tpot)
    summary.update(trace=args.trace, window=args.window, rate_scale=args.rate_scale, length_scale=args.length_scale,
                   output_scale=args.output_scale, url=args.url)
    # Put the timeline on the trace's clock: the load generator sends request i at its trace
    # timestamp after its own start-up, and both sides read CLOCK_MONOTONIC.
    sent = [r for r in rows if r["start_mono"] is not None and r["arrival_s"] is not None]
    origin = min(r["start_mono"] - r["arrival_s"] for r in sent) if sent else None
    timeline = [{**s, "t": s["mono"] - origin if origin is not None else s["t"] - t0} for s in poller.samples]
    (args.out / "timeline.json").write_text(json.dumps(timeline))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("system", "requests", "completed", "slo_attainment", "ttft_p95",
                                              "tpot_p95")}))
    if args.no_plot:
        return 0
    from morphserve.replay.plot import plot_timeline

    plot_timeline(rows, timeline, args.slo_ttft, args.out / "timeline.png", title=f"{system}: {args.trace} {args.window}")
    return 0
