"""The user-facing failure of this room: a model folder, quantized checkpoint or
evaluation text that cannot be used. It is not MorphServe's own error class because this
room must not import morphserve (the application sits on top of the rooms, not under
them); MorphServe reports both the same way, as one `error:` line (morphserve.errors.USER_ERRORS).
"""


class QuantLayersError(Exception):
    """Bad input to the weights side: a message for the user, never a traceback."""
