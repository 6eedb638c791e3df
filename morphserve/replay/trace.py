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

HASH_CHUNK = 16  # vLLM's timed_trace default: each generated hash id stands for this many tokens
MOONCAKE_HASH_BLOCK = 512  # a Mooncake trace's hash ids stand for 512-token blocks
TIMESTAMP_UNITS = {"s": 1.0, "ms": 0.001}
NAMED = {"azure-code": "azure_llm_2023_code.csv", "azure-conv": "azure_llm_2023_conv.csv"}


@dataclass(frozen=True)
class TraceRequest:
    timestamp: float  # seconds from the trace's start
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None = None  # from the file, when it carries them


def resolve(trace: str, traces_dir: Path) -> Path:
    if trace in NAMED:
        return traces_dir / NAMED[trace]
    path = Path(trace)
    if not path.exists():
        raise MorphServeError(f"trace {trace!r}: not one of {', '.join(NAMED)} and no such file")
    return path


def load(path: Path, timestamp_multiplier: float = 1.0) -> list[TraceRequest]:
    """`timestamp_multiplier` turns a JSONL trace's timestamps into seconds (0.001 for ms);
    the Azure CSVs carry absolute dates and ignore it."""
    if not (math.isfinite(timestamp_multiplier) and timestamp_multiplier > 0):
        raise MorphServeError(f"the timestamp multiplier must be positive, got {timestamp_multiplier}")
    return _load_csv(path) if path.suffix == ".csv" else _load_jsonl(path, timestamp_multiplier)


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


def _load_jsonl(path: Path, multiplier: float = 1.0) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
                ids = entry.get("hash_ids")
                if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)):
                    raise ValueError(f"hash_ids must be a list of integers, got {ids!r:.80}")
                req = TraceRequest(float(entry["timestamp"]) * multiplier, int(entry["input_length"]),
                                   int(entry["output_length"]), tuple(ids) if ids else None)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
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
        result.append(TraceRequest(round(r.timestamp - start, 4), inp, max(1, round(r.output_length * out_scale)),
                                   r.hash_ids))
    if not result:
        raise MorphServeError(f"window {start}:{duration} at rate scale {rate_scale} leaves no request")
    return result


def load_window(trace: str, traces_dir: Path, timestamp_unit: str, window: tuple[float, float], rate_scale: float,
                length_scale: float, output_scale: float | None = None,
                max_input: int | None = None) -> list[TraceRequest]:
    """The requests a replay sends: the named trace or file, read in its timestamp unit, then `prepare`d.
    One function for `morphserve replay` and the evaluation's pre-run checks, so both see the same requests."""
    loaded = load(resolve(trace, traces_dir), TIMESTAMP_UNITS[timestamp_unit])
    return prepare(loaded, window, rate_scale, length_scale, output_scale, max_input)


def write_timed_trace(reqs: list[TraceRequest], path: Path, hash_block_size: int = HASH_CHUNK) -> None:
    """One JSON line per request, timestamps in seconds. A request with hash ids from its
    file keeps them (padded with fresh ids if the prompt needs more blocks than it names:
    vLLM's generator would otherwise cut the prompt short); the others get fresh ids of
    their own (no shared prefixes)."""
    if hash_block_size < 1:
        raise MorphServeError(f"the hash block size must be at least 1, got {hash_block_size}")
    next_id = 1 + max((i for r in reqs for i in (r.hash_ids or ())), default=-1)
    with open(path, "w") as f:
        for r in reqs:
            n = -(-r.input_length // hash_block_size)  # an empty list would make an empty prompt
            ids = list(r.hash_ids or ())[:n]
            ids += range(next_id, next_id + n - len(ids))
            next_id += n - min(n, len(r.hash_ids or ()))
            f.write(json.dumps({"timestamp": r.timestamp, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": ids}) + "\n")


def hash_block_size(reqs: list[TraceRequest], given: int | None) -> int:
    """Tokens per hash id: what the caller says, else Mooncake's 512 when the trace carries
    its own ids, else vLLM's default of 16 for the ids we generate."""
    if given is not None:
        return given
    return MOONCAKE_HASH_BLOCK if any(r.hash_ids for r in reqs) else HASH_CHUNK
