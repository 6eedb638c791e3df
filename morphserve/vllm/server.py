"""vLLM's OpenAI server entry (`vllm.entrypoints.launchers.api_server.entry`), unchanged,
except that MorphServe's start-up refusals (a pack it cannot serve, more than one rank,
async scheduling, ...) end with one `error:` line and exit status 2 instead of a traceback.
`morphserve serve` execs this module; `bin/vllm` (morphserve/vllm/command.py) does the same.
"""

from __future__ import annotations

import sys

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


def main() -> int:
    import importlib

    vllm_main = importlib.import_module(PLAIN_VLLM_SERVER).main

    try:
        vllm_main()
    except Exception as e:
        why = refusal(e)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM's spawned processes re-import this file as __mp_main__
    sys.exit(main())
