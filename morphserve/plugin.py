"""vLLM `general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers).
Until the runtime issue lands, MorphServe installs nothing here: a server that merely has
the package installed must behave exactly like plain vLLM.
"""


def register() -> None:
    """Inert: activation through --additional-config '{"morphserve": ...}' comes with runtime swapping."""
    return None
