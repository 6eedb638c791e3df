"""Test-only fault injection, so the rollback paths run for real in the engine tests.

`MORPHSERVE_TEST_FAULTS=quantize,restore,restore_commit,kv_release,proof` makes the worker
raise once per named point (`proof`: a twin's compute fails its check call before install),
in the middle of that operation: `quantize` and `restore` inside a layer's swap, after its
first linear's new compute is built and before any is installed (the layer must stay
whole); `restore_commit` after a background restore installed a layer; `kv_release` after
the pool shrank. Unset, as in any real deployment, `maybe_fail` does nothing.

Under tensor parallelism `point@rank` fires on that rank only (`quantize@1`: rank 1 fails
part-way while the other ranks complete the same plan); a plain point fires on every rank.
"""

from __future__ import annotations

import os

ENV = "MORPHSERVE_TEST_FAULTS"
POINTS = ("quantize", "restore", "restore_commit", "kv_release", "proof")
_fired: set[str] = set()
_rank = 0


def set_rank(rank: int) -> None:
    """This worker's tensor-parallel rank (set once the worker knows it)."""
    global _rank
    _rank = int(rank)


class InjectedFault(RuntimeError):
    pass


def rank() -> int:
    return _rank


def armed() -> set[str]:
    """The points armed for this rank."""
    points = set()
    for item in (p.strip() for p in os.environ.get(ENV, "").split(",")):
        point, _, rank = item.partition("@")
        if point and (not rank or int(rank) == _rank):
            points.add(point)
    return points


def maybe_fail(point: str) -> None:
    """Raise InjectedFault the first time `point` is reached in this process, if armed."""
    assert point in POINTS, point
    if point in armed() and point not in _fired:
        _fired.add(point)
        raise InjectedFault(f"injected fault at {point} ({ENV})")
