"""Benchmark measurements in fresh child processes, one engine each.

A benchmark compares engines (plain vLLM, MorphServe) that cannot share a process, and
vLLM 0.32's CPU engine teardown can abort in C++ after the work is done. So the parent
re-runs its own script in a child per measurement: the child prints one `RESULT {json}`
line and exits without teardown; the parent reaps the child's process group (engine
processes can outlive it) and reads the line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn, Sequence

from morphserve.harness.servers import run_in_group

RESULT_PREFIX = "RESULT "


def emit_result(result: dict) -> NoReturn:
    """In the child: hand `result` to the parent and exit at once, skipping vLLM's teardown."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    os._exit(0)


def run_measurement(cmd: list[str]) -> dict | None:
    """In the parent: run one child to its end; its result, or None after printing the tail
    of its output to stderr when it failed or printed no result."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "child.log"
        returncode = run_in_group(cmd, log)
        text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    if returncode != 0 or line is None:
        print(text[-3000:], file=sys.stderr)
        return None
    return json.loads(line[len(RESULT_PREFIX):])


def run_children(script: str, modes: Sequence[str], args: list[str], label: str) -> dict[str, dict] | None:
    """In the parent: `script --child MODE ARGS` for each mode in turn, one fresh process
    each, never two engines at once; the results by mode, or None as soon as one fails."""
    results = {}
    for mode in modes:
        print(f"[{label}] {mode} ...", file=sys.stderr, flush=True)
        result = run_measurement([sys.executable, script, "--child", mode, *args])
        if result is None:
            return None
        results[mode] = result
    return results
