"""From per-run summaries to the suite's table: the median and range of every figure over
the repetitions, ratios against the baseline paired by repetition, ties and targets.
Plain Python.

A comparison is a *tie* when the range of the paired ratio (or difference) over the
repetitions contains "no change"; only a range entirely on one side is a win or a loss.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# the figures reported for every row, and whether lower is better
FIGURES = {
    "completed": False, "slo_violations": True, "slo_attainment": False, "ttft_p50": True, "ttft_p95": True,
    "ttft_p99": True, "tpot_p95": True, "throughput_tok_s": False, "peak_rss_anon_mib": True,
    "peak_rss_file_mib": True, "peak_rss_total_mib": True, "ppl_increase": True,
}
TARGETS = {"violations_fewer": 0.90, "ttft_p95_speedup": 2.0, "quality_fraction_of_static": 1 / 3}


@dataclass(frozen=True)
class Spread:
    median: float | None
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "n": self.n}


def spread(values: list[float | None]) -> Spread:
    vals = [v for v in values if v is not None]
    if not vals:
        return Spread(None, None, None, 0)
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b with infinities kept meaningful (a failed request's latency is infinite)."""
    if a is None or b is None:
        return None
    if math.isinf(a) and math.isinf(b):
        return 1.0
    if b == 0:
        return None if a == 0 else math.inf
    return a / b


def verdict(ratios: Spread, lower_is_better: bool = True) -> str:
    """'better', 'worse' or 'tie' from the range of ratios system/baseline."""
    if ratios.n == 0 or ratios.low is None:
        return "n/a"
    if ratios.n < 3:
        return f"no claim (n={ratios.n})"
    if ratios.low <= 1.0 <= ratios.high:
        return "tie"
    better = ratios.high < 1.0 if lower_is_better else ratios.low > 1.0
    return "better" if better else "worse"


def summarize_cell(runs: dict[str, dict[int, dict]], baseline: str, static_quantized: str | None) -> dict:
    """runs: system -> repetition -> run summary. Returns system -> figures, ratios, targets."""
    base = runs.get(baseline, {})
    static = runs.get(static_quantized, {}) if static_quantized else {}
    out = {}
    for system, reps in runs.items():
        row: dict = {"repetitions": sorted(reps), "requests": _first(reps, "requests")}
        for fig in FIGURES:
            row[fig] = spread([r.get(fig) for r in reps.values()]).as_dict()
        row["kv_blocks"] = _kv_blocks(reps)
        # how often a MorphServe worker's heap trimmer trimmed (its memory comes with it); None elsewhere
        trims = spread([(r.get("heap_trim") or {}).get("calls") for r in reps.values()])
        row["heap_trims"] = trims.as_dict() if trims.n else None
        # the MorphServe controller's seconds between steps (the worker waits for them), warm-up included
        between = spread([(r.get("boundary") or {}).get("total_s") for r in reps.values()])
        row["controller_s"] = between.as_dict() if between.n else None
        # vLLM's own preemptions over the replay (morphserve.evaluation.vllm_counters): a
        # preempted request recomputes, so an overloaded row's work differs by this
        preempted = spread([(r.get("vllm_counters") or {}).get("preemptions") for r in reps.values()])
        row["preemptions"] = preempted.as_dict() if preempted.n else None
        # the worker's CPU seconds and page faults over the replay (vLLM's model-running
        # process; with tensor parallelism, every rank's): the same requests, different work
        for key, fig in (("worker_cpu_s", "cpu_s"), ("worker_minor_faults", "minor_faults")):
            work = spread([_worker_work(r, fig) for r in reps.values()])
            row[key] = work.as_dict() if work.n else None
        if system != baseline and base:
            paired = [rep for rep in reps if rep in base]
            ttft = spread([_ratio(base[p]["ttft_p95"], reps[p]["ttft_p95"]) for p in paired])  # speed-up
            tpot = spread([_ratio(reps[p]["tpot_p95"], base[p]["tpot_p95"]) for p in paired])
            fewer = spread([_fewer(reps[p]["slo_violations"], base[p]["slo_violations"]) for p in paired])
            mem = spread([_ratio(reps[p].get("peak_rss_total_mib"), base[p].get("peak_rss_total_mib"))
                          for p in paired])
            row["vs_baseline"] = {
                "ttft_p95_speedup": {**ttft.as_dict(), "verdict": verdict(ttft, lower_is_better=False)},
                "tpot_p95_ratio": {**tpot.as_dict(), "verdict": verdict(tpot)},
                "violations_fewer": {**fewer.as_dict(), "verdict": _fewer_verdict(fewer)},
                "memory_ratio": mem.as_dict(),
            }
            row["targets"] = _targets(row, static, reps)
        out[system] = row
    return out


def model_processes(work: dict) -> list[dict]:
    """The `process_work` entries of the processes that run the model: vLLM's workers
    (VLLM::Worker, one per tensor-parallel rank), or, where vLLM runs no worker process (its
    `uni` executor: an engine started with VLLM_ENABLE_V1_MULTIPROCESSING=0 in its
    environment), the engine core, which then runs the model itself."""
    workers = [v for name, v in work.items() if "Worker" in name]
    return workers or [v for name, v in work.items() if "EngineCor" in name]


def _worker_work(run: dict, fig: str) -> float | None:
    """One figure of `process_work` summed over the processes that run the model; None for a
    run recorded before process_work existed."""
    values = [v[fig] for v in model_processes(run.get("process_work") or {})]
    return sum(values) if values else None


def _first(reps: dict[int, dict], key: str):
    for r in reps.values():
        return r.get(key)
    return None


def _kv_blocks(reps: dict[int, dict]) -> dict:
    vals = [r.get("kv_blocks") for r in reps.values() if r.get("kv_blocks")]
    return vals[0] if vals else {}


def _fewer(v: int, v_base: int) -> float | None:
    """Fraction of the baseline's violations avoided (negative: more violations)."""
    if v_base == 0:
        return None if v == 0 else -math.inf
    return 1 - v / v_base


def _fewer_verdict(s: Spread) -> str:
    if s.n == 0 or s.low is None:
        return "n/a"
    if s.n < 3:
        return f"no claim (n={s.n})"
    if s.low <= 0.0 <= s.high:
        return "tie"
    return "better" if s.low > 0 else "worse"


def _targets(row: dict, static: dict[int, dict], reps: dict[int, dict]) -> dict:
    vs = row["vs_baseline"]
    fewer, speed = vs["violations_fewer"], vs["ttft_p95_speedup"]
    static_inc = spread([r.get("ppl_increase") for r in static.values()]).median if static else None
    own_inc = row["ppl_increase"]["median"]
    quality_ok = None
    if static_inc is not None and own_inc is not None and static_inc > 0:
        quality_ok = own_inc <= TARGETS["quality_fraction_of_static"] * static_inc
    return {
        # met only when even the worst repetition meets it
        "violations_90pct_fewer": fewer["low"] is not None and fewer["low"] >= TARGETS["violations_fewer"],
        "ttft_p95_2x": speed["low"] is not None and speed["low"] >= TARGETS["ttft_p95_speedup"],
        "quality_third_of_static": quality_ok,
    }


def check_equal_work(runs: list[dict]) -> list[str]:
    """Every run of one cell must have replayed the same prompts (same trace file, same
    input lengths) and every completed request must have generated exactly the trace's
    output length. Returns the problems found (empty: equal work)."""
    problems = []
    if not runs:
        return problems
    ref = runs[0]
    for r in runs:
        who = f"{r['system']} rep {r['repetition']}"
        if r["trace_sha256"] != ref["trace_sha256"]:
            problems.append(f"{who}: replayed a different trace file than {ref['system']} rep {ref['repetition']}")
        if r["input_lens"] != ref["input_lens"]:
            problems.append(f"{who}: prompt lengths differ from {ref['system']} rep {ref['repetition']}")
        wanted = r["requested_output_lens"]
        for i, (ok, got) in enumerate(zip(r["ok"], r["output_lens"])):
            if ok and got != wanted[i]:
                problems.append(f"{who}: request {i} generated {got} tokens, the trace asks for {wanted[i]}")
                break
    return problems
