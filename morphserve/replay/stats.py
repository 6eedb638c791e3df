"""From `vllm bench serve --save-detailed` output to MorphServe's summary.json and
requests.jsonl. Plain Python; percentiles are nearest-rank.

A request that failed counts as a violation and as an infinite TPOT in every percentile,
and as an infinite TTFT unless its first token arrived before it failed: taking
percentiles over completed requests only would make a system that drops requests look
faster. A request cut at the evaluation's deadline after its first token had that token at
a known time, so its TTFT is that time, not infinity (counting it infinite made P95 TTFT
read "infinite" for a system that had answered every request's first token)."""

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
        itls = (bench.get("itls") or [[]] * n)[i] or []
        # A failed (e.g. cut) request may still have streamed tokens before it failed: their
        # arrival times are kept, since the server computed them at some precision.
        streamed = ok or (ttft or 0) > 0
        rows.append({"index": i, "arrival_s": arrivals[i] if i < len(arrivals) else None,
                     # time.perf_counter() of the load generator: CLOCK_MONOTONIC, the same
                     # clock in every process on the machine, so it lines up with the timeline
                     "start_mono": starts[i] if i < len(starts) else None,
                     "input_len": bench["input_lens"][i], "output_len": out_len, "ok": ok,
                     # a failed request's first token, when it arrived (see the module's docstring)
                     "ttft_s": ttft if streamed else None, "tpot_s": tpot, "latency_s": latency if ok else None,
                     "error": error or None,
                     # seconds after the request's start at which each output token arrived
                     "token_offsets_s": _token_offsets(ttft, itls) if streamed else None,
                     # tokens the client received: all of them, or one per streamed chunk of a
                     # failed request (vLLM's load generator counts none for it)
                     "served_tokens": out_len if ok else (1 + len(itls) if streamed else 0)})
    return rows


def _token_offsets(ttft: float, itls: list[float]) -> list[float]:
    out, t = [ttft], ttft
    for gap in itls:
        t += gap
        out.append(t)
    return [round(x, 6) for x in out]


def summarize(system: str, rows: list[dict], duration_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    done = [r for r in rows if r["ok"]]
    inf = float("inf")
    ttfts = [r["ttft_s"] if r["ttft_s"] is not None else inf for r in rows]
    tpots = [r["tpot_s"] if r["ok"] else inf for r in rows]
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
