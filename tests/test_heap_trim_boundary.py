"""Heap trims at step boundaries (mode "boundary"): when the engine core asks its workers
to trim, and what a failed ask does. Pure logic with a fake clock and stand-ins; the real
engine's trims are counted in tests/test_evaluate_e2e.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from morphserve.runtime.heap_trimmer import BoundaryTrims, HeapTrimmer


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_trim_is_due_after_a_step_and_then_not_again_within_the_interval():
    clock = Clock()
    trims = BoundaryTrims(0.5, clock=clock)
    assert not trims.due()  # no step yet: nothing freed to hand back
    trims.stepped()
    assert trims.due()
    trims.done()
    trims.stepped()
    clock.now += 0.49
    assert not trims.due()  # inside the interval: later steps wait
    clock.now += 0.02
    assert trims.due()


def test_an_idle_server_is_not_trimmed_again_until_it_steps():
    clock = Clock()
    trims = BoundaryTrims(0.5, clock=clock)
    trims.stepped()
    trims.done()
    clock.now += 60
    assert not trims.due()  # idle since the last trim: nothing owed
    trims.stepped()
    assert trims.due()


def test_interval_zero_never_trims():
    trims = BoundaryTrims(0.0)
    trims.stepped()
    assert not trims.due()


def _controller(interval: float, wants_ticks: bool = False, fail: bool = False):
    from morphserve.runtime.controller import MorphController

    calls: list[str] = []

    def rpc(method, *args):
        calls.append(method)
        if fail:
            raise RuntimeError("worker gone")
        return [{"calls": len(calls)}]

    c = object.__new__(MorphController)
    c.engine = SimpleNamespace(rpc=rpc)
    c.heap_trims = BoundaryTrims(interval, clock=Clock())
    c.own_trims = BoundaryTrims(0.0)  # frontend mode "thread": the engine core's own trims are its thread's
    boundaries: list[bool] = []
    c.wants_idle_ticks = lambda: wants_ticks
    c.on_step_boundary = lambda stepped=True: boundaries.append(stepped)
    return c, calls, boundaries


def test_an_idle_moment_after_steps_trims_once():
    c, calls, boundaries = _controller(0.5)
    c.on_idle()
    assert calls == []  # never stepped
    c.heap_trims.stepped()
    c.on_idle()
    c.on_idle()
    assert calls == ["morphserve_trim_heap"] and boundaries == []


def test_an_idle_moment_is_a_boundary_where_the_policy_wants_ticks():
    c, calls, boundaries = _controller(0.5, wants_ticks=True)
    c.on_idle()
    assert boundaries == [False]  # not a step: the boundary trims only what earlier steps owe


def test_a_failed_trim_is_logged_not_raised_and_not_retried_at_once(caplog):
    c, calls, _ = _controller(0.5, fail=True)
    c.heap_trims.stepped()
    with caplog.at_level(logging.ERROR, logger="morphserve"):
        c.trim_heap_if_due()
        c.heap_trims.stepped()
        c.trim_heap_if_due()  # within the interval of the failed one
    assert calls == ["morphserve_trim_heap"]
    assert "heap trim failed" in caplog.text


def test_a_boundary_trimmer_starts_no_thread_and_trims_when_asked():
    calls = []
    trimmer = HeapTrimmer(0.5, trim=calls.append)  # the default mode
    assert trimmer.mode == "boundary" and not trimmer.start()
    trimmer.tick()
    assert calls == [0] and trimmer.report()["running"] and trimmer.report()["mode"] == "boundary"
    threaded = HeapTrimmer(0.01, trim=calls.append, mode="thread")
    assert threaded.start()
    threaded.stop()


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="boundary, thread"):
        HeapTrimmer(0.5, trim=lambda pad: 0, mode="sometimes")


def test_in_frontend_mode_idle_the_engine_core_trims_itself_only_at_an_idle_moment_after_steps():
    c, calls, _ = _controller(0.0)  # no worker trims: only the engine core's own
    own: list[int] = []
    clock = Clock()
    c.own_trims = BoundaryTrims(10.0, clock=clock)
    c.own_trimmer = HeapTrimmer(10.0, trim=own.append, mode="boundary")
    c.on_idle()
    assert own == []  # nothing served since start: nothing new to hand back
    c.own_trims.stepped()
    c.on_idle()
    c.on_idle()
    assert own == [0] and calls == []  # once, in this process, no worker call
    c.own_trims.stepped()
    c.on_idle()
    assert own == [0]  # within the interval
    clock.now += 10.0
    c.on_idle()
    assert own == [0, 0]


def test_a_failed_own_trim_is_logged_and_serving_goes_on(caplog):
    c, _, _ = _controller(0.0)

    def broken(_):
        raise OSError("no libc")

    c.own_trims = BoundaryTrims(10.0, clock=Clock())
    c.own_trimmer = HeapTrimmer(10.0, trim=broken, mode="boundary")
    c.own_trims.stepped()
    with caplog.at_level(logging.ERROR, logger="morphserve"):
        c.on_idle()
    assert "own heap trim failed" in caplog.text and not c.own_trims.owed


def test_in_mode_idle_a_worker_trims_at_idle_moments_and_under_load_only_past_its_high_water_mark():
    mib = 2**20
    heap = [300 * mib]
    trims: list[int] = []

    def trim(pad):
        trims.append(pad)
        heap[0] = 40 * mib  # a trim hands the freed buffers back

    trimmer = HeapTrimmer(5.0, trim=trim, mode="idle", rss=lambda: heap[0])
    assert not trimmer.start()  # asked by the engine core, as in mode "boundary"
    trimmer.tick(busy=True)  # the first ask under load: learns the heap's level, trims nothing
    assert trims == []
    trimmer.tick(busy=False)  # an idle moment: trims whatever the growth
    assert len(trims) == 1
    for resident in (150, 300, 363):  # the next burst refaults its buffers back to the old level: no trim
        heap[0] = resident * mib
        trimmer.tick(busy=True)
    assert len(trims) == 1 and trimmer.skipped == 4
    heap[0] = 364 * mib  # 64 MiB past the high-water mark: a heap that keeps growing is handed back
    trimmer.tick(busy=True)
    assert len(trims) == 2
    heap[0] = 420 * mib  # refaulted past the old mark, but under 364 + 64
    trimmer.tick(busy=True)
    assert len(trims) == 2
    boundary = HeapTrimmer(5.0, trim=trims.append, rss=lambda: heap[0])  # the default mode ignores `busy`
    boundary.tick(busy=True)
    assert len(trims) == 3


def test_in_mode_idle_the_engine_core_tells_the_workers_whether_requests_are_running():
    from morphserve.runtime.controller import MorphController

    asked: list[tuple] = []
    c = object.__new__(MorphController)
    c.engine = SimpleNamespace(rpc=lambda method, *args: asked.append((method, *args)) or [{}])
    clock = Clock()
    c.heap_trims = BoundaryTrims(5.0, clock=clock)
    c.own_trims = BoundaryTrims(0.0)
    c.trims_say_busy = True
    c.wants_idle_ticks = lambda: False
    c.heap_trims.stepped()
    c.trim_heap_if_due(busy=True)  # a boundary between two steps
    clock.now += 5.0
    c.heap_trims.stepped()
    c.on_idle()  # an idle moment after steps
    assert asked == [("morphserve_trim_heap", True), ("morphserve_trim_heap", False)]
    assert MorphController.trims_say_busy is False  # modes "boundary" and "thread" call as before


def test_mode_idle_measures_growth_on_the_heap_not_the_whole_resident_set():
    """A move up writes KV blocks for the first time: the resident set grows by a hundred MiB
    the trims cannot return. Mode "idle" reads the `[heap]` mapping, where the worker's freed
    per-call buffers are, so first KV writes ask for no trim under load."""
    from morphserve.runtime.heap_trimmer import _heap_or_resident_bytes, heap_resident_bytes, resident_bytes

    heap = heap_resident_bytes()
    assert heap is None or 0 < heap <= resident_bytes()  # this process's own smaps
    assert HeapTrimmer(5.0, trim=lambda pad: 0, mode="idle")._rss is _heap_or_resident_bytes
    assert HeapTrimmer(5.0, trim=lambda pad: 0)._rss is resident_bytes  # the other modes as before
    if heap is None:
        return
    before = resident_bytes()
    big = bytearray(b"\x01") * (96 * 2**20)  # written, like a move's first KV blocks, in a mapping of its own
    try:
        assert resident_bytes() - before >= 90 * 2**20  # the whole resident set grew ...
        assert heap_resident_bytes() - heap < 64 * 2**20  # ... the heap did not
    finally:
        del big
