"""The pre-run check for requests longer than max_model_len (morphserve.evaluation.window_fit):
pure logic, and the real suite window whose request 11 vLLM stopped at 2,048 tokens."""

from pathlib import Path

from morphserve.evaluation.suite import load_suite
from morphserve.evaluation.window_fit import over_length, warning, window_requests
from morphserve.replay.trace import TraceRequest

REPO = Path(__file__).resolve().parent.parent


def _req(prompt: int, output: int) -> TraceRequest:
    return TraceRequest(0.0, prompt, output, None)


def test_only_requests_over_the_model_length_are_named():
    reqs = [_req(100, 100), _req(48, 2000), _req(49, 2000), _req(2048, 1)]
    assert over_length(reqs, 2048) == [2, 3]
    line = warning("w", reqs, 2048)
    assert "2 of 4 requests" in line and "request 2, 49 prompt + 2000 output" in line


def test_a_window_that_fits_gives_no_warning():
    assert warning("w", [_req(10, 10)], 2048) is None


def test_the_zen4_capacity_beyond_window_names_the_request_vllm_stopped():
    suite = load_suite(REPO / "evaluations" / "suite-v4-zen4-beyond.yaml")
    reqs = window_requests(suite.windows[0])
    assert len(reqs) == 61
    assert over_length(reqs, suite.max_model_len) == [11]
    assert reqs[11].output_length == 1688 and reqs[11].input_length + 1679 == suite.max_model_len


def test_evaluate_names_the_long_request_before_any_server_starts(capsys):
    from morphserve.evaluation.cli import warn_over_length

    warn_over_length(load_suite(REPO / "evaluations" / "suite-v4-zen4-beyond.yaml"))
    err = capsys.readouterr().err
    assert err.startswith("warning: window conv-2400-kv-z4c: 1 of 61 requests") and "request 11" in err


def test_a_trace_it_cannot_read_is_left_to_the_replay(tmp_path, capsys):
    from morphserve.evaluation.cli import warn_over_length

    suite = tmp_path / "s.yaml"
    text = (REPO / "evaluations" / "suite-v4-zen4-beyond.yaml").read_text()
    suite.write_text(text.replace("trace: azure-conv", f"trace: {tmp_path / 'missing.csv'}"))
    warn_over_length(load_suite(suite))
    assert capsys.readouterr().err == ""
