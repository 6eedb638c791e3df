"""Head-to-head: plain vLLM FP16, plain vLLM serving the static W4A16 twin, and MorphServe
with each preset, one after another on this machine, replaying the same trace window
under the same memory budget (weights + KV). Writes OUT/comparison.{md,json,png} and one
`morphserve replay` folder per system.

    python scripts/evaluate.py --model MODEL_DIR --pack PACK_DIR --out OUT \
        --trace azure-conv --window 1640:60 --rate-scale 0.142857 --length-scale 0.25 --output-scale 0.5 \
        --budget-mb 329

Budget: plain FP16 gets budget - bf16 weights as KV; static W4 gets budget - W4 weights
(the bytes quantization frees become KV); MorphServe gets the budget and moves between.
Quality: WikiText-2 perplexity of the served configuration from the pack's quality.json;
for MorphServe, weighted by the output tokens generated at each level.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from morphserve.controller import model_weight_bytes  # noqa: E402
from morphserve.server_proc import free_port, start_server, stop_server  # noqa: E402
from morphserve.replay_stats import tokens_by_level, weighted_ppl  # noqa: E402

SYSTEMS = ("fp16", "w4", "accuracy", "default", "performance")


def server_command(system: str, args, port: int, out: Path) -> tuple[list[str], dict]:
    budget = int(args.budget_mb * 10**6)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    common = ["--port", str(port), "--max-model-len", str(args.max_model_len), "--max-num-seqs", "64",
              "--enforce-eager", "--served-model-name", "model"]
    bf16 = model_weight_bytes(args.model)
    if system in ("fp16", "w4"):
        env["VLLM_PLUGINS"] = ""  # plain vLLM: MorphServe not loaded at all
        model = args.model if system == "fp16" else args.pack / "quantized"
        kv = budget - (bf16 if system == "fp16" else model_weight_bytes(model))
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model),
               "--tokenizer", str(args.model), "--kv-cache-memory-bytes", str(kv), *common]
        return cmd, env
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", str(args.model), "--pack", str(args.pack),
           "--policy", system, "--memory-budget-gb", str(budget / 2**30), "--shrink-strategy", args.shrink_strategy,
           "--transition-log", str(out / "transitions.jsonl"), "--kv-cache-memory-bytes", str(budget - bf16), *common]
    return cmd, env


def run_system(system: str, args, quality: dict) -> dict:
    out = args.out / system
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd, env = server_command(system, args, port, out)
    print(f"[evaluate] {system}: starting server", file=sys.stderr, flush=True)
    try:
        proc = start_server(cmd, env, out / "server.log", port)
    except RuntimeError as e:
        raise SystemExit(f"{system}: {e}") from None
    try:
        replay = [sys.executable, "-m", "morphserve.cli", "replay", "--trace", args.trace, "--window", args.window,
                  "--rate-scale", str(args.rate_scale), "--length-scale", str(args.length_scale),
                  "--url", f"http://127.0.0.1:{port}", "--out", str(out), "--slo-ttft", str(args.slo_ttft),
                  "--slo-tpot", str(args.slo_tpot), "--system", system, "--tokenizer", str(args.model)]
        if args.output_scale is not None:
            replay += ["--output-scale", str(args.output_scale)]
        if args.max_input:
            replay += ["--max-input", str(args.max_input)]
        print(f"[evaluate] {system}: replaying", file=sys.stderr, flush=True)
        subprocess.run(replay, cwd=REPO, check=True)
    finally:
        stop_server(proc)
    summary = json.loads((out / "summary.json").read_text())
    curve = {int(k): v for k, v in quality["orders"]["lis"]["ppl"].items()}
    if system == "fp16":
        summary["ppl"] = quality["fp16_ppl"]
    elif system == "w4":
        summary["ppl"] = quality["all_quantized_ppl"]
    else:
        rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
        levels = tokens_by_level(rows, json.loads((out / "timeline.json").read_text()))
        summary["ppl"] = weighted_ppl(levels, curve)
        summary["tokens_by_level"] = {str(k): round(v, 1) for k, v in sorted(levels.items())}
        log = out / "transitions.jsonl"
        summary["transitions"] = len(log.read_text().splitlines()) if log.exists() else 0
    summary["ppl_increase"] = summary["ppl"] / quality["fp16_ppl"] - 1
    return summary


def table(results: dict) -> str:
    fp16 = results.get("fp16")
    lines = ["| system | completed | SLO attainment (TTFT & TPOT) | violations | vs FP16 | P95 TTFT (s) | vs FP16 | "
             "P99 TTFT (s) | P95 TPOT (s) | throughput (tok/s) | perplexity | increase |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        v_ratio = "-"
        if fp16 and fp16["slo_violations"] and s is not fp16:
            change = 1 - s["slo_violations"] / fp16["slo_violations"]
            v_ratio = f"{change:.0%} fewer" if change >= 0 else f"{-change:.0%} more"
        t_ratio = f"{fp16['ttft_p95'] / s['ttft_p95']:.2f}x" if fp16 and s["ttft_p95"] and s is not fp16 else "-"
        lines.append(f"| {name} | {s['completed']}/{s['requests']} | {s['slo_attainment']:.1%} | {s['slo_violations']} | "
                     f"{v_ratio} | {s['ttft_p95']:.2f} | {t_ratio} | {s['ttft_p99']:.2f} | {s['tpot_p95']:.3f} | "
                     f"{s['throughput_tok_s']:.1f} | {s['ppl']:.2f} | {s['ppl_increase']:+.1%} |")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [results[n]["slo_attainment"] * 100 for n in names])
    axes[0].set_ylabel("SLO attainment (%)")
    axes[1].bar(names, [results[n]["ttft_p95"] for n in names])
    axes[1].set_ylabel("P95 TTFT (s)")
    axes[2].bar(names, [results[n]["ppl_increase"] * 100 for n in names])
    axes[2].set_ylabel("perplexity increase (%)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--window", default="1640:60")
    ap.add_argument("--rate-scale", type=float, default=1 / 7)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--output-scale", type=float, default=0.5)
    ap.add_argument("--max-input", type=int, default=1500, help="cap inputs so input + output fits max-model-len")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--budget-mb", type=float, default=329, help="weights + KV, in 10^6 bytes (default 329: bf16 weights + 60 MB of KV, the capacity-bound budget of docs/RESULTS.md)")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.2)
    ap.add_argument("--shrink-strategy", default="wait", choices=("wait", "preempt", "migrate"))
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    quality = json.loads((args.pack / "quality.json").read_text())
    results = {}
    for system in args.systems.split(","):
        results[system] = run_system(system, args, quality)
        (args.out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    (args.out / "comparison.md").write_text(md + "\n")
    figure(results, args.out / "comparison.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
