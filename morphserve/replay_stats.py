"""From `vllm bench serve --save-detailed` output to MorphServe's summary.json and
requests.jsonl. Plain Python; percentiles are nearest-rank."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def per_request(bench: dict, arrivals: list[float]) -> list[dict]:
    rows = []
    n = len(bench["ttfts"])
    for i in range(n):
        error = bench["errors"][i] if i < len(bench.get("errors", [])) else ""
        ttft, latency, out_len = bench["ttfts"][i], bench["latencies"][i], bench["output_lens"][i]
        ok = not error and latency > 0 and out_len > 0
        tpot = (latency - ttft) / (out_len - 1) if ok and out_len > 1 else (0.0 if ok else None)
        starts = bench.get("start_times") or []
        rows.append({"index": i, "arrival_s": arrivals[i] if i < len(arrivals) else None,
                     # time.perf_counter() of the load generator: CLOCK_MONOTONIC, the same
                     # clock in every process on the machine, so it lines up with the timeline
                     "start_mono": starts[i] if i < len(starts) else None,
                     "input_len": bench["input_lens"][i], "output_len": out_len, "ok": ok,
                     "ttft_s": ttft if ok else None, "tpot_s": tpot, "latency_s": latency if ok else None,
                     "error": error or None})
    return rows


def summarize(system: str, rows: list[dict], duration_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    done = [r for r in rows if r["ok"]]
    ttfts = [r["ttft_s"] for r in done]
    tpots = [r["tpot_s"] for r in done]
    meets_ttft = [r for r in done if r["ttft_s"] <= slo_ttft]
    meets_both = [r for r in meets_ttft if r["tpot_s"] <= slo_tpot]
    n = len(rows)
    out = {"system": system, "requests": n, "completed": len(done), "failed": n - len(done),
           # failed requests count as violations
           "slo_ttft_s": slo_ttft, "slo_tpot_s": slo_tpot,
           "slo_attainment_ttft": len(meets_ttft) / n if n else 0.0,
           "slo_attainment": len(meets_both) / n if n else 0.0,
           "slo_violations": n - len(meets_both),
           "duration_s": duration_s,
           "throughput_tok_s": sum(r["output_len"] for r in done) / duration_s if duration_s else 0.0,
           "goodput_req_s": len(meets_both) / duration_s if duration_s else 0.0}
    for name, values in (("ttft", ttfts), ("tpot", tpots)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    return out


def tokens_by_level(rows: list[dict], timeline: list[dict]) -> dict[int, float]:
    """Output tokens generated at each quantization level: each request's tokens are spread
    evenly over its decode interval [start + ttft, start + latency], and the level at a
    moment is the last timeline sample before it (`mono` clock)."""
    samples = sorted((s["mono"], s["quantized_layers"]) for s in timeline if "mono" in s)
    out: dict[int, float] = {}
    for r in rows:
        if not r["ok"] or r["start_mono"] is None or not r["output_len"]:
            continue
        a, b = r["start_mono"] + r["ttft_s"], r["start_mono"] + r["latency_s"]
        if not samples or b <= a:
            level = _level_at(samples, a)
            out[level] = out.get(level, 0.0) + r["output_len"]
            continue
        points = [a] + [t for t, _ in samples if a < t < b] + [b]
        for lo, hi in zip(points, points[1:]):
            level = _level_at(samples, lo)
            out[level] = out.get(level, 0.0) + r["output_len"] * (hi - lo) / (b - a)
    return out


def _level_at(samples: list[tuple[float, int]], t: float) -> int:
    level = samples[0][1] if samples else 0
    for when, k in samples:
        if when > t:
            break
        level = k
    return level


def weighted_ppl(levels: dict[int, float], ppl_by_level: dict[int, float]) -> float | None:
    """Token-weighted perplexity: exp of the token-weighted mean log-perplexity."""
    import math as _m

    total = sum(levels.values())
    if not total:
        return None
    return _m.exp(sum(n * _m.log(ppl_by_level[k]) for k, n in levels.items()) / total)
