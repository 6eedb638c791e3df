"""The exceptions a user can cause (USER_ERRORS).

The CLI prints one as a single `error: ...` line and exits non-zero; any other exception
is a bug in MorphServe and keeps its traceback.
"""

from __future__ import annotations

from quant_layers.errors import QuantLayersError


class MorphServeError(Exception):
    """A user-facing failure: bad input, a mismatched pack, a missing environment."""


# Everything a user can cause, across the rooms (the weights room has its own class).
USER_ERRORS: tuple[type[Exception], ...] = (MorphServeError, QuantLayersError)


def first_field_error(e) -> tuple[str, str, str, str | None]:
    """The first problem pydantic found, as (dotted location, message, error type, the
    offending input as short JSON or None when the key is missing). Every config file
    MorphServe reads reports one problem per run, in one line; `policies` keeps its own
    copy because that room does not import morphserve."""
    import json

    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    given = None if first["type"] == "missing" else json.dumps(first.get("input"), default=str)[:80]
    return where, first["msg"].removeprefix("Value error, "), first["type"], given
