"""vLLM `general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers).
It installs MorphServe's hooks (morphserve/vllm_patches.py). They are inert unless
`--additional-config '{"morphserve": {...}}'` activates MorphServe, so a server that merely
has the package installed behaves exactly like plain vLLM. A hook that cannot be
installed is an error, never a silent fallback.
"""

import logging


def register() -> None:
    from morphserve.vllm_patches import apply_patches

    apply_patches()
    logging.getLogger("morphserve").debug("MorphServe hooks installed")
