"""Traces for replay: the Azure LLM 2023 CSVs or any `timed_trace` JSONL, cut to a window,
thinned, length-scaled, and written as the JSONL `vllm bench serve --dataset-name
timed_trace` replays. Plain Python; every malformed line is reported by file and line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from morphserve.errors import MorphServeError

HASH_CHUNK = 16  # vLLM's timed_trace expands each hash id into this many tokens
NAMED = {"azure-code": "azure_llm_2023_code.csv", "azure-conv": "azure_llm_2023_conv.csv"}


@dataclass(frozen=True)
class TraceRequest:
    timestamp: float  # seconds from the trace's start
    input_length: int
    output_length: int


def resolve(trace: str, shared: Path) -> Path:
    if trace in NAMED:
        return shared / "traces" / NAMED[trace]
    path = Path(trace)
    if not path.exists():
        raise MorphServeError(f"trace {trace!r}: not one of {', '.join(NAMED)} and no such file")
    return path


def load(path: Path) -> list[TraceRequest]:
    return _load_csv(path) if path.suffix == ".csv" else _load_jsonl(path)


def _load_csv(path: Path) -> list[TraceRequest]:
    out, t0 = [], None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise MorphServeError(f"{path}:1: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                ts = datetime.fromisoformat(row["TIMESTAMP"].strip()[:26]).timestamp()
                inp, outp = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (ValueError, TypeError, AttributeError) as e:
                raise MorphServeError(f"{path}:{line}: bad row {row}: {e}") from None
            if inp < 1 or outp < 1:
                raise MorphServeError(f"{path}:{line}: token counts must be positive, got {inp}, {outp}")
            t0 = ts if t0 is None else t0
            out.append(TraceRequest(ts - t0, inp, outp))
    return _sorted(out, path)


def _load_jsonl(path: Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
                req = TraceRequest(float(entry["timestamp"]), int(entry["input_length"]), int(entry["output_length"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise MorphServeError(
                    f"{path}:{line}: expected JSON with timestamp, input_length, output_length: {e}") from None
            if req.input_length < 1 or req.output_length < 1 or not math.isfinite(req.timestamp):
                raise MorphServeError(f"{path}:{line}: lengths must be positive and the timestamp finite")
            out.append(req)
    return _sorted(out, path)


def _sorted(reqs: list[TraceRequest], path: Path) -> list[TraceRequest]:
    if not reqs:
        raise MorphServeError(f"{path}: the trace holds no request")
    return sorted(reqs, key=lambda r: r.timestamp)


def parse_window(text: str) -> tuple[float, float]:
    try:
        start, duration = (float(x) for x in text.split(":"))
    except ValueError:
        raise MorphServeError(f"--window must be START:DURATION in seconds, got {text!r}") from None
    if start < 0 or duration <= 0:
        raise MorphServeError(f"--window needs START >= 0 and DURATION > 0, got {text!r}")
    return start, duration


def prepare(reqs: list[TraceRequest], window: tuple[float, float], rate_scale: float, length_scale: float,
            output_scale: float | None = None, max_input: int | None = None) -> list[TraceRequest]:
    """Cut the window, keep a `rate_scale` fraction of requests evenly (timing kept), scale
    input lengths by `length_scale` and outputs by `output_scale` (default: the same)."""
    if not 0 < rate_scale <= 1:
        raise MorphServeError(f"--rate-scale must be in (0, 1], got {rate_scale}")
    if length_scale <= 0:
        raise MorphServeError(f"--length-scale must be positive, got {length_scale}")
    start, duration = window
    cut = [r for r in reqs if start <= r.timestamp < start + duration]
    kept = [r for i, r in enumerate(cut) if math.floor((i + 1) * rate_scale) > math.floor(i * rate_scale)]
    out_scale = length_scale if output_scale is None else output_scale
    result = []
    for r in kept:
        inp = max(1, round(r.input_length * length_scale))
        if max_input:
            inp = min(inp, max_input)
        result.append(TraceRequest(round(r.timestamp - start, 4), inp, max(1, round(r.output_length * out_scale))))
    if not result:
        raise MorphServeError(f"window {start}:{duration} at rate scale {rate_scale} leaves no request")
    return result


def write_timed_trace(reqs: list[TraceRequest], path: Path) -> None:
    """One JSON line per request; each gets its own hash ids (no shared prefixes)."""
    next_id = 0
    with open(path, "w") as f:
        for r in reqs:
            n = -(-r.input_length // HASH_CHUNK)  # an empty list would make an empty prompt
            f.write(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(range(next_id, next_id + n))}) + "\n")
            next_id += n
