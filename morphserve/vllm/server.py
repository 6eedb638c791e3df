"""vLLM's OpenAI server entry (`vllm.entrypoints.launchers.api_server.entry`), unchanged,
except that MorphServe's start-up refusals (a pack it cannot serve, more than one rank,
async scheduling, ...) end with one `error:` line and exit status 2 instead of a traceback.
`morphserve serve` execs this module; `bin/vllm` (morphserve/vllm/command.py) does the same.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from morphserve.errors import USER_ERRORS

# Plain vLLM's OpenAI server, as `vllm serve` runs it: the baseline every comparison starts
# (`python -m PLAIN_VLLM_SERVER --model ...`); this module wraps the same entry.
PLAIN_VLLM_SERVER = "vllm.entrypoints.launchers.api_server.entry"


def refusal(error: BaseException) -> Exception | None:
    """The user error (USER_ERRORS) behind `error`, if any (vLLM may wrap or chain it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


REFUSAL_FILE_ENV = "MORPHSERVE_REFUSAL_FILE"


def relay_refusal(error: BaseException) -> None:
    """In the engine core, for a user error raised while it is built (a budget with no room
    for a max_model_len request, ...): vLLM builds the engine core in a process of its own
    and tells this one only "Engine core initialization failed", so the reason goes to the
    file `run_refusing` named, and the engine core exits without vLLM's traceback. Does
    nothing in an engine no such server started (an in-process engine keeps the exception)."""
    path = os.environ.get(REFUSAL_FILE_ENV)
    if path and isinstance(error, USER_ERRORS):
        Path(path).write_text(str(error))
        raise SystemExit(2) from None


def run_refusing(entry: Callable[[], int | None]) -> int:
    """Run vLLM's entry; a MorphServe refusal, raised here or in the engine core, ends in one
    `error:` line and exit status 2."""
    fd, path = tempfile.mkstemp(prefix="morphserve-refusal-")
    os.close(fd)
    os.environ[REFUSAL_FILE_ENV] = path
    try:
        return entry() or 0
    except Exception as e:
        why = refusal(e) or Path(path).read_text().strip()
        if not why:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2
    finally:
        os.environ.pop(REFUSAL_FILE_ENV, None)
        Path(path).unlink(missing_ok=True)


def main() -> int:
    import importlib

    return run_refusing(importlib.import_module(PLAIN_VLLM_SERVER).main)


if __name__ == "__main__":  # vLLM's spawned processes re-import this file as __mp_main__
    sys.exit(main())
