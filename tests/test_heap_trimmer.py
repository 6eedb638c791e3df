"""The worker's heap trimmer: its thread logic with a counting stand-in, and the real glibc
malloc_trim returning memory freed in the middle of the heap (which glibc never returns
by itself)."""

from __future__ import annotations

import ctypes
import os
import time

import pytest

from morphserve.runtime.heap_trimmer import HeapTrimmer, _libc_trim
from morphserve.runtime.proc_memory import process_rss


def test_the_thread_trims_every_interval_and_stops():
    calls = []
    trimmer = HeapTrimmer(0.01, trim=calls.append, min_growth_bytes=0, mode="thread")  # no margin: every interval
    assert trimmer.start()
    assert not trimmer.start()  # one thread per worker
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trimmer.stop()
    n = len(calls)
    assert n >= 3 and set(calls) == {0}  # malloc_trim(0): keep no padding at the top
    time.sleep(0.05)
    assert len(calls) == n  # stopped means stopped
    report = trimmer.report()
    assert report["calls"] == n and not report["running"] and report["interval_s"] == 0.01


def test_a_steady_process_is_trimmed_once_and_again_only_after_growing_by_the_margin():
    mib = 2**20
    rss = [500 * mib]
    calls = []
    trimmer = HeapTrimmer(0.5, trim=calls.append, min_growth_bytes=32 * mib, rss=lambda: rss[0])
    trimmer.tick()  # no floor yet: the first interval trims
    assert len(calls) == 1
    for resident in (510, 520, 531):  # a steady server refaulting its working set: under the margin
        rss[0] = resident * mib
        trimmer.tick()
    assert len(calls) == 1 and trimmer.skipped == 3
    rss[0] = 532 * mib  # a long prompt's freed buffers: 32 MiB above the floor
    trimmer.tick()
    assert len(calls) == 2
    rss[0] = 400 * mib  # KV released: the floor follows the resident set down ...
    trimmer.tick()
    assert len(calls) == 2
    rss[0] = 433 * mib  # ... so growth is counted from there
    trimmer.tick()
    assert len(calls) == 3
    report = trimmer.report()
    assert (report["calls"], report["skipped"], report["min_growth_bytes"]) == (3, 4, 32 * mib)


def test_the_margin_reads_this_process_resident_set():
    from morphserve.runtime.heap_trimmer import resident_bytes

    assert abs(resident_bytes() - process_rss(os.getpid())["rss_anon_bytes"]
               - process_rss(os.getpid())["rss_file_bytes"]) < 64 * 2**20


def test_interval_zero_or_no_glibc_means_no_thread():
    assert not HeapTrimmer(0, trim=lambda pad: 0).start()
    assert not HeapTrimmer(0.5, trim=None).available or _libc_trim() is not None


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert _libc_trim() is None
    assert not HeapTrimmer(0.5, mode="thread").start()


def test_a_failing_trim_stops_the_thread_without_raising():
    def boom(pad):
        raise RuntimeError("no")

    trimmer = HeapTrimmer(0.01, trim=boom, mode="thread")
    trimmer.start()
    trimmer._thread.join(timeout=5)
    assert not trimmer._thread.is_alive()
    trimmer.stop()


@pytest.mark.skipif(_libc_trim() is None, reason="needs glibc's malloc (no preloaded allocator)")
def test_real_malloc_trim_returns_memory_freed_in_the_middle_of_the_heap():
    """64 KiB chunks (under glibc's mmap threshold, so on the heap), one kept above them so
    the heap's top cannot shrink: freeing the rest releases nothing by itself. The trimmer
    runs from before the allocation, as in a worker, so its first trim has set the floor:
    the 100 MiB come back at the next tick because the resident set grew past the margin."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trimmer = HeapTrimmer(0.5, min_growth_bytes=32 * 2**20, mode="thread")  # the allocation fits between two ticks
    trimmer.start()
    guard = None
    try:
        deadline = time.monotonic() + 20  # generous: a busy CI core may starve the thread
        while trimmer.calls < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        first = trimmer.calls
        chunk, count = 64 * 1024, 1600  # 100 MiB
        ptrs = []
        for _ in range(count):
            p = libc.malloc(chunk)
            ctypes.memset(p, 1, chunk)  # resident
            ptrs.append(p)
        guard = libc.malloc(chunk)
        ctypes.memset(guard, 1, chunk)
        for p in ptrs:
            libc.free(p)
        held = process_rss(os.getpid())["rss_anon_bytes"]
        deadline = time.monotonic() + 20  # generous: a busy CI core may starve the thread
        while time.monotonic() < deadline and held - process_rss(os.getpid())["rss_anon_bytes"] < 64 * 2**20:
            time.sleep(0.05)
        returned = held - process_rss(os.getpid())["rss_anon_bytes"]
    finally:
        trimmer.stop()
        if guard is not None:
            libc.free(guard)
    assert returned >= 64 * 2**20, f"only {returned / 2**20:.0f} MiB of 100 freed came back"
    assert first >= 1 and trimmer.calls > first


def _trims_reach(calls: list, n: int, timeout_s: float = 5.0) -> bool:
    """Whether a trimmer's thread has made `n` calls within `timeout_s` (it runs on its own clock)."""
    deadline = time.monotonic() + timeout_s
    while len(calls) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(calls) >= n


def test_a_front_process_trims_at_once_then_every_interval_and_starts_once(monkeypatch):
    from morphserve.runtime import heap_trimmer

    monkeypatch.setattr(heap_trimmer, "_process_trimmer", None)
    calls = []
    assert heap_trimmer.trim_this_process(0.0, trim=calls.append) is None and calls == []  # off: nothing runs
    trimmer = heap_trimmer.trim_this_process(0.05, trim=calls.append)
    try:
        assert trimmer is not None and calls == [0]  # the start-up heap goes at once, not an interval later
        assert heap_trimmer.trim_this_process(0.05, trim=calls.append) is trimmer  # one thread per process
        assert _trims_reach(calls, 3)
    finally:
        trimmer.stop()


def test_a_front_process_in_mode_idle_waits_for_nothing_in_flight(monkeypatch):
    from morphserve.runtime import heap_trimmer

    monkeypatch.setattr(heap_trimmer, "_process_trimmer", None)
    monkeypatch.setattr(heap_trimmer, "IDLE_POLL_S", 0.01)
    calls, busy = [], [True]
    trimmer = heap_trimmer.trim_this_process(0.02, trim=calls.append, idle=lambda: not busy[0])
    try:
        assert calls == [0]  # the start-up heap still goes at once
        time.sleep(0.2)
        assert calls == [0]  # due many times over, but a request was in flight throughout
        busy[0] = False
        assert _trims_reach(calls, 2)
    finally:
        trimmer.stop()


def test_the_api_server_is_idle_with_no_unfinished_request_or_no_engine_yet():
    from types import SimpleNamespace

    from morphserve.vllm.patches import _api_server_idle

    def app(client):
        return SimpleNamespace(state=SimpleNamespace(**({} if client is None else {"engine_client": client})))

    def client(unfinished):
        return SimpleNamespace(output_processor=SimpleNamespace(has_unfinished_requests=lambda: unfinished))

    assert _api_server_idle(app(None))  # before the engine is up
    assert _api_server_idle(app(client(False)))
    assert not _api_server_idle(app(client(True)))
