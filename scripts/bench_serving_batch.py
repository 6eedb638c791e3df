"""Many requests at once, plain vLLM on the pack's static W8A8 checkpoint against MorphServe on
the same rung: what MorphServe's serving path costs per token while a batch decodes.

scripts/bench_serving_prefill.py times one request at a time; the evaluation's rows mix
arrivals, queueing and preemptions, so a few percent of step time is lost in their spread.
Here every server gets the same closed-loop load from vLLM's own `vllm bench serve`
(random prompts of `--input-tokens`, exactly `--output-tokens` generated, `--concurrency`
in flight, `--requests` in all, a fixed seed), with KV room for all of them at once, so no
request is preempted and the batch stays full. Systems:
- `plain`: plain vLLM serving the pack's W8A8 checkpoint;
- `held`: MorphServe after the evaluation's warm-up transitions, held at its ladder's top
  (all-W8A8 on a W8A8-only pack): no policy, the serving path and the boundary hooks only;
- `held-once`: MorphServe moved to its ladder's top once and held there, with no round trip
  (its layers quantized once, never restored);
- `policy`: MorphServe after the same warm-up with its `--policy` in charge, as `morphserve
  evaluate` runs it (it moves to the top for speed at the first request).
Servers are started one at a time, in alternation for `--rounds` rounds, so a machine's drift
lands on all of them. Prints, per system, output tokens/s, median TPOT and median TTFT as the
median [range] over rounds, and each over plain's; a ratio whose ranges overlap plain's is a tie.

    python scripts/bench_serving_batch.py --model MODEL_DIR --pack PACK_DIR [--systems plain,held,policy]
        [--concurrency 12] [--requests 36] [--input-tokens 256] [--output-tokens 128] [--rounds 3] [--compile]

Every server runs eager (`--enforce-eager`) unless `--compile` is given: then plain vLLM runs its
own CPU default (compiled) and MorphServe `serve --compile`, as the evaluation's compiled systems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from morphserve.errors import MorphServeError  # noqa: E402
from morphserve.evaluation import vllm_counters  # noqa: E402
from morphserve.evaluation.runner import MemorySampler  # noqa: E402
from morphserve.evaluation.systems import static_w8a8_dir  # noqa: E402
from morphserve.harness.servers import free_port, start_server, stop_server  # noqa: E402
from morphserve.runtime import huge_pages, onednn_cache  # noqa: E402
from scripts.bench_serving_prefill import _get, _ids, _post  # noqa: E402  (the same requests and helpers)
from morphserve.vllm.server import PLAIN_VLLM_SERVER  # noqa: E402

SYSTEMS = ("plain", "held", "held-once", "policy")
# A MorphServe system may end in one heap-trim setting: -trim-S (every S seconds, at step
# boundaries), -grow-M (every 0.5 s once the worker grew M MiB since its last trim) or -trim-off.
TRIM_SUFFIXES = ("-trim-off", "-trim-", "-grow-")


# ... or end in -front: its engine core and API server kept off the worker's cores
# (`--frontend-cpus auto`), alone or after a heap-trim setting.
FRONT_SUFFIX = "-front"
# ... or end in -cold-off: no cold KV tail (`--kv-cold-tail off`), alone or after the others.
COLD_OFF_SUFFIX = "-cold-off"


# ... or end in -hp: MorphServe asks for huge pages itself (`--huge-pages auto`, serve's
# default) whatever --huge-pages gives the others, as the evaluation runs it beside plain vLLM.
HP_SUFFIX = "-hp"
# The suffixes that add one serve flag each, after any other, checked last-suffix first.
TRAILING_FLAGS = ((HP_SUFFIX, ("--huge-pages", "auto")), (COLD_OFF_SUFFIX, ("--kv-cold-tail", "off")),
                  (FRONT_SUFFIX, ("--frontend-cpus", "auto")))


def trim_args(system: str) -> tuple[str, list[str]]:
    """`system` split into its base (plain, held or policy) and its serve flags (heap trims,
    the engine core's placement, the cold KV tail, huge pages)."""
    for suffix, extra in TRAILING_FLAGS:
        if system.endswith(suffix):
            inner = system.removesuffix(suffix)
            base, flags = trim_args(inner)
            if base in ("held", "held-once", "policy") and (flags or base == inner):
                return base, [*flags, *extra]
            return system, []
    for suffix in TRIM_SUFFIXES:
        base, sep, value = system.partition(suffix)
        if not sep or base not in ("held", "held-once", "policy"):
            continue
        try:
            if suffix == "-trim-off" and not value:
                return base, ["--heap-trim-interval", "0"]
            if suffix == "-trim-" and float(value) > 0:
                return base, ["--heap-trim-interval", value]
            if suffix == "-grow-" and float(value) > 0:
                return base, ["--heap-trim-min-growth-mb", value]
        except ValueError:
            pass
    return system, []


def command(system: str, args, port: int, transition_log: Path | None = None) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(VLLM_LOGGING_LEVEL="WARNING")
    onednn_cache.bounded(env)  # the kernel cache `morphserve serve` bounds, for plain vLLM too (as the evaluation does)
    huge_pages.apply(env, args.huge_pages)  # the same huge pages for every system (serve would ask for them itself)
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
              "--max-num-seqs", "64", "--served-model-name", "model", "--seed", "0", "--dtype", args.dtype,
              "--kv-cache-memory-bytes", str(args.kv_mb * 2**20)]
    if system == "plain":
        env["VLLM_PLUGINS"] = ""
        # compiled is plain vLLM's own CPU default: no flag at all
        return [sys.executable, "-m", PLAIN_VLLM_SERVER, "--model", str(static_w8a8_dir(Path(args.pack))),
                "--tokenizer", args.model, *common, *([] if args.compile else ["--enforce-eager"])], env
    _, trim = trim_args(system)
    return [sys.executable, "-m", "morphserve.cli", "serve", args.model, "--pack", args.pack, "--policy", args.policy,
            "--compile" if args.compile else "--enforce-eager",
            *(["--transition-log", str(transition_log)] if transition_log is not None else []),
            "--manual-min-interval", "0", "--huge-pages", args.huge_pages, *trim, *common], env


def load(base: str, args, out: Path) -> dict:
    """One closed-loop load from vLLM's benchmark client; its saved result."""
    name = out.name + ".json"
    cmd = [sys.executable, "-m", "morphserve.vllm.bench", "serve", "--backend", "vllm", "--base-url", base,
           "--model", "model", "--tokenizer", args.model, "--dataset-name", "random",
           "--random-input-len", str(args.input_tokens), "--random-output-len", str(args.output_tokens),
           "--random-range-ratio", "0", "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
           "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-tqdm",
           "--ready-check-timeout-sec", "0", "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", name]
    with open(out.with_suffix(".bench.log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"}).returncode
    if rc != 0:
        raise SystemExit(f"vllm bench serve failed (exit {rc}): see {out.with_suffix('.bench.log')}")
    return json.loads((out.parent / name).read_text())


def run_one(system: str, args, round_no: int) -> dict:
    port = free_port()
    tag = f"{system}-r{round_no}"
    cmd, env = command(system, args, port, args.out / f"{tag}.transitions.jsonl")
    proc = start_server(cmd, env, args.out / f"{tag}.log", port, timeout=600)
    base = f"http://127.0.0.1:{port}"
    try:
        for k in range(3):
            _post(base, "/v1/completions", {"model": "model", "prompt": _ids(64, k), "max_tokens": 8})
        level = None
        kind = trim_args(system)[0]
        if kind != "plain":  # the evaluation's warm-up transitions, then held or handed to the policy
            top = _get(base, "/morphserve/state?memory=0")["max_level"]
            for lv in (top,) if kind == "held-once" else (top, 0):
                _post(base, "/morphserve/level", {"level": lv})
                _post(base, "/v1/completions", {"model": "model", "prompt": _ids(64, 9), "max_tokens": 8})
            _post(base, "/morphserve/level", {"level": None if kind == "policy" else top})
        rss = MemorySampler(proc.pid, every=0.2)  # the evaluation's own peak-RSS sampler
        rss.start()
        try:
            result = load(base, args, args.out / tag)
        finally:
            rss.stop.set()
            rss.join()
        # vLLM's own preemption counter (the load is meant to fit: a preemption would recompute)
        preemptions = vllm_counters.read(base).get("preemptions")
        if system != "plain":
            state = _get(base, "/morphserve/state?memory=0")
            level = state.get("level")
    finally:
        stop_server(proc)
    return {"system": system, "round": round_no, "output_tok_s": result["output_throughput"],
            "tpot_median_s": result["median_tpot_ms"] / 1000, "ttft_median_s": result["median_ttft_ms"] / 1000,
            "completed": result["completed"], "level_after": level, "preemptions": preemptions,
            "peak_rss_mib": rss.peak["total"] / 2**20}


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model directory (the evaluation's)")
    ap.add_argument("--pack", required=True, help="the MorphServe pack directory (it must hold a W8A8 tier)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}, "
                    "held and policy optionally ending in -trim-S, -grow-M or -trim-off (the heap trimmer every S "
                    "seconds, after M MiB of growth, or off; default: serve's), then optionally -front (its engine "
                    "core and API server off the worker's cores: --frontend-cpus auto), then optionally -cold-off (no cold KV "
                    "tail: --kv-cold-tail off); run in this order each round")
    ap.add_argument("--policy", default="default", help="the `policy` system's policy preset or YAML")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternation (each starts every system once)")
    ap.add_argument("--concurrency", type=int, default=12, help="requests in flight at once")
    ap.add_argument("--requests", type=int, default=36, help="requests per server")
    ap.add_argument("--input-tokens", type=int, default=256, help="prompt tokens per request")
    ap.add_argument("--output-tokens", type=int, default=128, help="tokens each request generates")
    ap.add_argument("--kv-mb", type=int, default=160,
                    help="every server's --kv-cache-memory-bytes in MiB: room for the whole batch at once")
    ap.add_argument("--dtype", default="bfloat16", help="the servers' --dtype")
    ap.add_argument("--max-model-len", type=int, default=2048, help="every server's --max-model-len")
    ap.add_argument("--compile", action="store_true",
                    help="every server compiled (plain vLLM without --enforce-eager, `morphserve serve --compile`) "
                         "instead of eager")
    ap.add_argument("--huge-pages", choices=huge_pages.MODES, default="off",
                    help="every server's huge pages, plain vLLM's included (default off: plain vLLM as it starts; "
                         "auto: the environment `morphserve serve --huge-pages auto` gives)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_serving_batch"), help="logs and results.json")
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if trim_args(s)[0] not in SYSTEMS or (s != trim_args(s)[0] and not trim_args(s)[1])]
    if unknown:
        ap.error(f"unknown system(s) {', '.join(unknown)}: choose from {', '.join(SYSTEMS)}")
    try:  # a pack that cannot serve static W8A8 fails here, in one line, before any server starts
        static_w8a8_dir(Path(args.pack))
    except (MorphServeError, OSError, ValueError) as e:
        ap.error(f"--pack {args.pack}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for r in range(1, args.rounds + 1):
        for system in systems:
            run = run_one(system, args, r)
            runs.append(run)
            print(f"round {r} {system}: {run['output_tok_s']:.1f} output tok/s, TPOT {run['tpot_median_s']:.4f} s, "
                  f"TTFT {run['ttft_median_s']:.3f} s, level after {run['level_after']}, preemptions "
                  f"{run['preemptions']}, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
            (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    print("\n| system | output tok/s | over plain | median TPOT (s) | over plain | median TTFT (s) | over plain "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    base = {k: [x[k] for x in runs if x["system"] == "plain"] for k in ("output_tok_s", "tpot_median_s", "ttft_median_s")}
    for system in systems:
        cells = []
        for k, digits in (("output_tok_s", 1), ("tpot_median_s", 4), ("ttft_median_s", 3)):
            mine = [x[k] for x in runs if x["system"] == system]
            ratio = f"{statistics.median(mine) / statistics.median(base[k]):.3f}x" if base[k] else "-"
            cells += [spread(mine, digits), ratio]
        peaks = [x["peak_rss_mib"] for x in runs if x["system"] == system]
        cells.append(f"{statistics.median(peaks):.0f} [{min(peaks):.0f}, {max(peaks):.0f}]")
        print(f"| {system} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
