"""vLLM's own scheduler counters over one replay, for every system alike.

An overloaded row is decided by what the scheduler did as much as by the kernels: a
preempted request gives up its KV and recomputes its prompt and the tokens it had made, so
two servers at the same rung can serve the same tokens with different work. vLLM counts
this in its Prometheus metrics (the API server's registry; on a MorphServe server the scrape
also refreshes MorphServe's gauges with one engine-core state read, no worker call), so the
evaluation reads them twice, after the warm-up and after the replay, outside the replay, and
keeps the difference in run.json. Parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# run.json key -> vLLM 0.32 sample name (counters carry a `_total` sample; histograms `_sum` / `_count`)
COUNTERS = {
    "preemptions": "vllm:num_preemptions_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "steps": "vllm:iteration_tokens_total_count",
    "step_tokens": "vllm:iteration_tokens_total_sum",
}


def parse(text: str) -> dict[str, float]:
    """The counters above from a /metrics page, summed over label sets (one engine here);
    a counter the page lacks is left out."""
    wanted = {sample: key for key, sample in COUNTERS.items()}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                found[key] = found.get(key, 0.0) + sample.value
    return found


def read(base: str, timeout: float = 30) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as r:
        return parse(r.read().decode())


def between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the replay added: after - before, for counters read both times."""
    return {k: round(after[k] - before[k], 3) for k in COUNTERS if k in before and k in after}
