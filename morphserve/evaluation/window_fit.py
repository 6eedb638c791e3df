"""Requests a window asks for that the servers cannot serve as asked: prompt plus output over
`max_model_len`. vLLM stops such a request at the model length, for every system alike, so
the comparison stays fair, but the report's equal-work check then names it after the whole
suite has run (and `evaluate` exits 1). Saying so before the first server starts lets the
suite's author scale the window differently while it costs nothing. Plain Python over the
prepared trace.
"""

from __future__ import annotations

from morphserve.replay.trace import TraceRequest


def over_length(reqs: list[TraceRequest], max_model_len: int) -> list[int]:
    """Indices of the requests whose prompt plus output exceeds `max_model_len`."""
    return [i for i, r in enumerate(reqs) if r.input_length + r.output_length > max_model_len]


def warning(window: str, reqs: list[TraceRequest], max_model_len: int) -> str | None:
    """One line for the operator, or None when every request fits."""
    over = over_length(reqs, max_model_len)
    if not over:
        return None
    first = reqs[over[0]]
    return (f"warning: window {window}: {len(over)} of {len(reqs)} requests ask for more tokens than max_model_len "
            f"({max_model_len}) holds (first: request {over[0]}, {first.input_length} prompt + "
            f"{first.output_length} output tokens); vLLM stops them at {max_model_len} for every system, and the "
            "report's equal-work check will name them")


def window_requests(window) -> list[TraceRequest]:
    """The requests `morphserve replay` sends for a suite window (the same preparation)."""
    from morphserve.offline.datafiles import traces_dir
    from morphserve.replay import trace

    return trace.load_window(window.trace, traces_dir(), window.timestamp_unit, (window.start_s, window.duration_s),
                             window.rate_scale, window.length_scale, window.output_scale, window.max_input)
