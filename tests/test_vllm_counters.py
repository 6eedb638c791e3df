"""vLLM's scheduler counters as the evaluation reads them (pure parsing, milliseconds)."""

from __future__ import annotations

import pytest

from morphserve.evaluation import vllm_counters

# Lines as vLLM 0.32's /metrics writes them (engine and model labels, _created samples beside)
PAGE = """\
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="model"} 14.0
vllm:num_preemptions_created{engine="0",model_name="model"} 1.7960170812016978e+09
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="model"} 27720.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="model"} 11162.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="model"} 256.0
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="model"} 145.0
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="model"} 1860.0
vllm:iteration_tokens_total_count{engine="0",model_name="model"} 1860.0
vllm:iteration_tokens_total_sum{engine="0",model_name="model"} 38882.0
"""


def test_the_counters_are_read_from_a_metrics_page():
    got = vllm_counters.parse(PAGE)
    assert got == {"preemptions": 14.0, "prompt_tokens": 27720.0, "generation_tokens": 11162.0,
                   "prefix_cache_hits": 256.0, "steps": 1860.0, "step_tokens": 38882.0}
    assert "prefix_cache_queries" not in got  # absent from the page: left out, not zero


def test_the_replay_is_what_was_added_between_two_readings():
    before = vllm_counters.parse(PAGE.replace("14.0", "2.0").replace("1860.0", "60.0"))
    after = vllm_counters.parse(PAGE)
    added = vllm_counters.between(before, after)
    assert added["preemptions"] == 12.0 and added["steps"] == 1800.0 and added["prompt_tokens"] == 0.0
    assert "prefix_cache_queries" not in added


def test_a_page_that_is_not_prometheus_text_is_a_value_error():
    with pytest.raises(ValueError):
        vllm_counters.parse("vllm:num_preemptions_total{engine= 14\n")
