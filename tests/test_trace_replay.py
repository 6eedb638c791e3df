"""Trace parsing, windowing and summary statistics (pure, no server)."""

import json

import pytest

from morphserve import trace
from morphserve.errors import MorphServeError
from morphserve.replay_stats import per_request, percentile, summarize
from tests.conftest import SHARED


def test_azure_conv_window_matches_the_calibration_in_design_md():
    reqs = trace.load(SHARED / "traces/azure_llm_2023_conv.csv")
    window = trace.prepare(reqs, (1640, 60), 1 / 7, 0.25, 0.5)
    assert len(window) == 72
    assert 300 < sum(r.input_length for r in window) / 72 < 330
    assert all(0 <= r.timestamp < 60 for r in window)


def test_timed_trace_output_has_one_hash_id_per_16_tokens(tmp_path):
    out = tmp_path / "t.jsonl"
    trace.write_timed_trace([trace.TraceRequest(0.0, 33, 5), trace.TraceRequest(0.5, 16, 1)], out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(x["hash_ids"]) for x in lines] == [3, 1]
    assert set(lines[0]["hash_ids"]).isdisjoint(lines[1]["hash_ids"])
    assert trace.load(out) == [trace.TraceRequest(0.0, 33, 5), trace.TraceRequest(0.5, 16, 1)]


@pytest.mark.parametrize("suffix, text, where", [
    (".jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "input_length": 5}\n', ":2:"),
    (".jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3}\nnot json\n', ":2:"),
    (".jsonl", '{"timestamp": 0, "input_length": 0, "output_length": 3}\n', ":1:"),
    (".csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,3\n2023-11-16 18:17:04,ten,3\n", ":3:"),
    (".csv", "TIME,ContextTokens\n", ":1:"),
])
def test_malformed_traces_name_the_file_and_line(tmp_path, suffix, text, where):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(MorphServeError) as e:
        trace.load(path)
    assert f"{path}{where}" in str(e.value)


def test_window_and_scale_errors():
    reqs = [trace.TraceRequest(float(i), 100, 10) for i in range(10)]
    with pytest.raises(MorphServeError, match="leaves no request"):
        trace.prepare(reqs, (100, 5), 1.0, 1.0)
    with pytest.raises(MorphServeError, match="rate-scale"):
        trace.prepare(reqs, (0, 5), 2.0, 1.0)
    with pytest.raises(MorphServeError, match="START:DURATION"):
        trace.parse_window("10-20")
    assert len(trace.prepare(reqs, (0, 10), 0.5, 1.0)) == 5


def test_summary_counts_failures_as_violations():
    bench = {"ttfts": [0.5, 3.0, 0.0], "latencies": [1.5, 4.0, 0.0], "output_lens": [11, 11, 0],
             "input_lens": [10, 10, 10], "errors": ["", "", "boom"]}
    rows = per_request(bench, [0.0, 1.0, 2.0])
    assert rows[0]["tpot_s"] == pytest.approx(0.1) and not rows[2]["ok"]
    s = summarize("x", rows, 10.0, slo_ttft=2.0, slo_tpot=0.2)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["slo_attainment_ttft"] == pytest.approx(1 / 3) and s["slo_violations"] == 2
    assert s["ttft_p50"] == 0.5 and s["ttft_p99"] == 3.0
    assert percentile([], 50) is None


def test_tokens_are_attributed_to_the_level_in_force_while_they_were_generated():
    from morphserve.replay_stats import tokens_by_level, weighted_ppl

    rows = [{"ok": True, "start_mono": 100.0, "ttft_s": 1.0, "latency_s": 5.0, "output_len": 40}]
    timeline = [{"mono": 99.0, "quantized_layers": 0}, {"mono": 102.0, "quantized_layers": 8},
                {"mono": 104.0, "quantized_layers": 0}]
    levels = tokens_by_level(rows, timeline)
    assert levels[0] == pytest.approx(20) and levels[8] == pytest.approx(20)
    assert weighted_ppl(levels, {0: 10.0, 8: 40.0}) == pytest.approx(20.0)
