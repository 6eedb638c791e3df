"""One exception type for everything a user can cause.

The CLI prints a MorphServeError as a single `error: ...` line and exits non-zero; any
other exception is a bug in MorphServe and keeps its traceback.
"""


class MorphServeError(Exception):
    """A user-facing failure: bad input, a mismatched pack, a missing environment."""
