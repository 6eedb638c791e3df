"""Test-only fault injection, so the rollback paths run for real in the engine tests.

`MORPHSERVE_TEST_FAULTS=quantize,restore,restore_commit,kv_release,proof` makes the worker
raise once per named point (`proof`: a twin's compute fails its check call before install),
in the middle of that operation: `quantize` and `restore` inside a layer's swap, after its
first linear's new compute is built and before any is installed (the layer must stay
whole); `restore_commit` after a background restore installed a layer; `kv_release` after
the pool shrank. Unset, as in any real deployment, `maybe_fail` does nothing.
"""

from __future__ import annotations

import os

ENV = "MORPHSERVE_TEST_FAULTS"
POINTS = ("quantize", "restore", "restore_commit", "kv_release", "proof")
_fired: set[str] = set()


class InjectedFault(RuntimeError):
    pass


def armed() -> set[str]:
    return {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}


def maybe_fail(point: str) -> None:
    """Raise InjectedFault the first time `point` is reached in this process, if armed."""
    assert point in POINTS, point
    if point in armed() and point not in _fired:
        _fired.add(point)
        raise InjectedFault(f"injected fault at {point} ({ENV})")
