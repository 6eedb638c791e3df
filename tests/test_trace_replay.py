"""Trace parsing, windowing and summary statistics (pure, no server)."""

import json

import pytest

from morphserve.replay.run import trace
from morphserve.errors import MorphServeError
from morphserve.replay.stats import per_request, percentile, summarize
from morphserve.offline.datafiles import traces_dir


def test_azure_conv_window_matches_the_calibration_in_design_md():
    reqs = trace.load(traces_dir() / "azure_llm_2023_conv.csv")
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
    assert [(r.timestamp, r.input_length, r.output_length) for r in trace.load(out)] == [(0.0, 33, 5), (0.5, 16, 1)]


def test_a_mooncake_trace_replays_with_ms_timestamps_and_its_own_512_token_hash_ids(tmp_path):
    src = tmp_path / "mooncake.jsonl"
    src.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 7, "hash_ids": [5, 6, 7]}\n'
                   '{"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [5, 9]}\n')
    reqs = trace.load(src, trace.TIMESTAMP_UNITS["ms"])
    assert [r.timestamp for r in reqs] == [0.0, 1.5]
    window = trace.prepare(reqs, (0, 2), 1.0, 1.0)
    block = trace.hash_block_size(window, None)
    assert block == 512
    out = tmp_path / "t.jsonl"
    trace.write_timed_trace(window, out, block)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["hash_ids"] == [5, 6, 7] and lines[1]["hash_ids"] == [5, 9]  # the shared prefix is kept
    assert lines[1]["timestamp"] == 1.5
    # a prompt scaled up past its ids gets fresh ones, never reused ids
    longer = trace.prepare(reqs, (0, 2), 1.0, 2.0)
    trace.write_timed_trace(longer, out, block)
    ids = [json.loads(x)["hash_ids"] for x in out.read_text().splitlines()]
    assert ids[0][:3] == [5, 6, 7] and len(ids[0]) == 5 and min(ids[0][3:]) > 9
    assert len(ids[1]) == 3 and set(ids[0][3:]).isdisjoint(ids[1][2:])
    with pytest.raises(MorphServeError, match="multiplier"):
        trace.load(src, 0.0)


@pytest.mark.parametrize("suffix, text, where", [
    (".jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "input_length": 5}\n', ":2:"),
    (".jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3}\nnot json\n', ":2:"),
    (".jsonl", '{"timestamp": 0, "input_length": 0, "output_length": 3}\n', ":1:"),
    (".jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": "abc"}\n', ":1:"),
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
    bench = {"ttfts": [0.5, 3.0, 0.0, 0.7], "latencies": [1.5, 4.0, 0.0, 0.0], "output_lens": [11, 11, 0, 0],
             "input_lens": [10, 10, 10, 10], "errors": ["", "", "boom", "cut"],
             "itls": [[0.1] * 10, [0.1] * 10, [], [0.2, 0.2]]}
    rows = per_request(bench, [0.0, 1.0, 2.0, 3.0])
    # the cut request streamed 3 tokens before it failed: kept for the quality accounting
    assert rows[3]["token_offsets_s"] == [0.7, 0.9, 1.1] and rows[3]["served_tokens"] == 3
    assert rows[2]["token_offsets_s"] is None and rows[2]["served_tokens"] == 0
    rows = rows[:3]
    assert rows[0]["tpot_s"] == pytest.approx(0.1) and not rows[2]["ok"]
    s = summarize("x", rows, 10.0, slo_ttft=2.0, slo_tpot=0.2)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["slo_attainment_ttft"] == pytest.approx(1 / 3) and s["slo_violations"] == 2
    # the failed request is an infinite latency, not a missing one
    assert s["ttft_p50"] == 3.0 and s["ttft_p99"] == float("inf") and s["tpot_p95"] == float("inf")
    assert rows[0]["token_offsets_s"][0] == 0.5
    assert percentile([], 50) is None


def test_a_request_cut_after_its_first_token_counts_that_tokens_time_as_its_ttft():
    # two complete requests, one cut after its first token (at 0.7 s), one cut before any
    bench = {"ttfts": [0.5, 3.0, 0.7, 0.0], "latencies": [1.5, 4.0, 0.0, 0.0], "output_lens": [11, 11, 0, 0],
             "input_lens": [10] * 4, "errors": ["", "", "cut", "cut"], "itls": [[0.1] * 10, [0.1] * 10, [0.2], []]}
    rows = per_request(bench, [0.0, 1.0, 2.0, 3.0])
    assert rows[2]["ttft_s"] == 0.7 and rows[3]["ttft_s"] is None
    s = summarize("x", rows, 10.0, slo_ttft=2.0, slo_tpot=0.2)
    # still a violation and an infinite TPOT; its TTFT is known, the other's is not
    assert s["slo_violations"] == 3 and s["completed"] == 2 and s["slo_attainment_ttft"] == pytest.approx(1 / 4)
    assert sorted(r["ttft_s"] or float("inf") for r in rows) == [0.5, 0.7, 3.0, float("inf")]
    assert s["ttft_p50"] == 0.7 and s["ttft_p95"] == float("inf") and s["tpot_p95"] == float("inf")
    s3 = summarize("x", rows[:3], 10.0, slo_ttft=2.0, slo_tpot=0.2)
    assert s3["ttft_p95"] == 3.0  # before: infinite, though every first token had arrived
