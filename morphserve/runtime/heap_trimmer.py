"""Hand the worker's freed heap back to the OS while it serves, every few hundred ms.

glibc keeps freed chunks inside its arenas, and only the top of an arena is ever returned
by itself; a chunk freed in the middle stays resident until something reuses it. vLLM's
CPU linears allocate a fresh activation buffer per call (the int8 path three: the
quantized input, its scales and the output), sized by the step's token count, so a server
fed prompts of many lengths leaves a growing tail of freed, resident heap. Measured on
SmolLM2-135M, 2 vCPUs (docs/RESULTS.md, "The heap a server keeps";
scripts/bench_heap_growth.py): after 96 prompts of 50-900 tokens a MorphServe worker
held at all-W8A8 kept 510 MiB of heap without the trimmer and 329 MiB with it (293 and 287
idle); plain FP16 vLLM kept 632 (485 idle). The thread's trims cost about 1% of a stream of
steps and no measurable step time (scripts/bench_heap_trim_speed.py).

`malloc_trim(0)` walks every arena and releases the free pages inside them too (glibc
>= 2.8), which no allocator setting does: a lower M_MMAP_THRESHOLD would instead turn every
activation buffer into an mmap/munmap pair and page faults on every call. Not used with a preloaded tcmalloc or jemalloc (their own `malloc_trim` is absent or a
no-op).

When it trims matters more than how often. Each trim releases the free pages of the
chunks the next steps reuse, and every page they touch again is a page fault (zero-filled)
in the forward's own thread. A trim in the middle of a long prompt's step releases the
buffers the layers after it allocate again at once: served one at a time on a Zen 4 EPYC,
a 1,344-token prompt's first token took 1.07x and 1.10x static W8A8's with a thread trimming
every 0.5 s (about four trims inside the step) and 0.99x / 1.02x without a trimmer
(docs/RESULTS.md, "The heap trimmer at step boundaries"). So by default (`mode="boundary"`) the engine core
asks its workers to trim at a step boundary at least `interval_s` after the last trim
(`BoundaryTrims`), and once more at the first idle moment after steps: a step pays at most
one refault of its buffers, never one per trim inside it. `mode="idle"` trims at idle
moments only, and under load only once the worker's heap has grown `BUSY_MIN_GROWTH_BYTES`
past its high-water mark (`heap_resident_bytes`): on an AMX Xeon, held at all-W8A8 on a
compute-bound window, the every-5 s boundary trims were 73% of the worker's extra CPU
against static W8A8 (58.3 against 56.8 s, 57.2 without trims, 40 MiB more worker heap;
docs/RESULTS.md, "dev-amx-trims"), while the growth bound keeps a server whose heap does
grow under load (the Zen 4's compute rows, 80-130 MiB) within that much of the boundary
mode's memory. `mode="thread"` keeps the earlier
daemon thread (ctypes drops the GIL; the forward waits on malloc's arena lock for the
trim's few ms), for comparison.

Each trim releases the free pages of the chunks the next steps reuse, and every page they
touch again is a page fault (zero-filled) in the forward's own thread. Trimming every
interval at a steady state cost the served requests 4-14% of their TPOT in one run on a
2-vCPU AVX2 EPYC and nothing measurable in the next (a tie over both; trimming every 5 s
kept the same memory and tied it on speed: docs/RESULTS.md, "The heap trimmer at a steady
state"). On a 2-vCPU Zen 4 EPYC the refaults were most of the worker's extra CPU per token
against static W8A8 (88% of its page faults inside its heap), so the default is 5 s, paid for
by the engine core and API server trimming their own heaps (`trim_this_process`): on a
saturated development window the pair cut the worker's CPU per token in all three
repetitions and its page faults by about half, at 51 MiB less peak RSS (docs/RESULTS.md,
"dev-zen4-front-trim"). With `min_growth_bytes` the
thread trims only once the resident set has grown that much above where the last trim left
it (or where it has fallen to since). That option is off by default (0: every interval):
on the one window it was measured on it tied the every-interval trimmer, at the same peak
RSS, in both repetitions' ranges, so it is not shown to remove the cost.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

log = logging.getLogger("morphserve")

DEFAULT_INTERVAL_S = 5.0  # with the front processes trimmed (FRONTEND_INTERVAL_S): see the module's docstring
FRONTEND_INTERVAL_S = 10.0  # the engine core's and API server's own trims (trim_this_process)
DEFAULT_MIN_GROWTH_BYTES = 0  # every interval: see the module's docstring
MODES = ("boundary", "thread", "idle")
BUSY_MIN_GROWTH_BYTES = 64 << 20  # mode "idle": the growth that makes a trim worth its refaults under load
DEFAULT_MODE = "boundary"  # see the module's docstring
FRONTEND_MODES = ("thread", "idle")
FRONTEND_DEFAULT_MODE = "thread"  # see trim_this_process; "idle" is measured in docs/RESULTS.md, suite-v4-zen4zb
IDLE_POLL_S = 0.5  # how often a due trim looks again for an idle moment


class BoundaryTrims:
    """The engine core's side of `mode="boundary"`: whether this boundary asks the workers
    to trim. Due once `interval_s` has passed since the last trim and a step has run since
    it (an idle server has nothing new to hand back); an idle moment after steps counts as a
    boundary, so a burst's last buffers are returned too. Plain Python: the clock is passed in."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._last = float("-inf")
        self.owed = False  # a step has run since the last trim

    def stepped(self) -> None:
        self.owed = True

    def due(self) -> bool:
        return self.interval_s > 0 and self.owed and self._clock() - self._last >= self.interval_s

    def done(self) -> None:
        self._last = self._clock()
        self.owed = False


def resident_bytes() -> int:
    """This process's resident set, from /proc/self/statm (one short read, no parsing of
    /proc/self/status: it runs every interval)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def heap_resident_bytes() -> int | None:
    """The resident bytes of the process's `[heap]` (glibc's main arena, where a worker's
    per-call buffers live), or None without one. Mode "idle" gates its trims under load on
    this rather than the whole resident set, which also grows as KV blocks are first written
    (a move up writes a hundred MiB of them): gated on the whole set, dev-amx-idle-trims'
    first reading trimmed under load as often as the boundary mode. The smaps read stops at
    the heap's entry, near the top of the address space's listing."""
    with open("/proc/self/smaps") as f:
        in_heap = False
        for line in f:
            if in_heap and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
            if line.rstrip().endswith("[heap]"):
                in_heap = True
    return None


def _heap_or_resident_bytes() -> int:
    heap = heap_resident_bytes()
    return heap if heap is not None else resident_bytes()


def _libc_trim():
    """glibc's malloc_trim, or None where malloc is not glibc's (a preloaded allocator)."""
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("tcmalloc", "jemalloc")):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """malloc_trim(0) once the resident set has grown `min_growth_bytes` since the last trim
    (0: every time), either when the engine core asks at a step boundary (`tick`, mode
    "boundary") or from a daemon thread every `interval_s` (mode "thread"); counts what it did."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, trim=None,
                 min_growth_bytes: int = DEFAULT_MIN_GROWTH_BYTES, rss=None, mode: str = DEFAULT_MODE,
                 idle=None):
        if mode not in MODES:
            raise ValueError(f"heap trim mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.interval_s = interval_s
        self.idle = idle  # mode "thread": a due trim waits until this says the process has nothing in flight
        self.min_growth_bytes = min_growth_bytes
        self._rss = rss if rss is not None else (_heap_or_resident_bytes if mode == "idle" else resident_bytes)
        self._floor: int | None = None  # the resident set after the last trim, or lower since
        self._high: int | None = None  # mode "idle": the largest heap a trim handed back (or first read under load)
        self.skipped = 0  # intervals with too little growth to trim
        self._trim = trim if trim is not None else _libc_trim()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.calls = 0
        self.seconds = 0.0  # time spent inside malloc_trim, for the state endpoint and tests

    @property
    def available(self) -> bool:
        return self._trim is not None and self.interval_s > 0

    def start(self) -> bool:
        """Start the thread (mode "thread" only; "boundary" trims when asked)."""
        if not self.available or self.mode != "thread" or self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name="morphserve-heap-trim", daemon=True)
        self._thread.start()
        return True

    def trim_once(self) -> None:
        t0 = time.perf_counter()
        self._trim(0)
        if self.min_growth_bytes > 0:  # where this trim left the process: growth is counted from here
            self._floor = self._rss()
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def due(self, busy: bool = False) -> bool:
        """Whether this interval trims: always without a margin; otherwise once the resident
        set is the margin above the floor (which follows it down). In mode "idle" a trim asked
        for while requests run (`busy`) goes ahead only once the heap is `BUSY_MIN_GROWTH_BYTES`
        above the largest heap a trim has handed back: counted from where a trim left it, the
        buffers the next steps refault are growth, and every trim would call for the next
        (dev-amx-idle-trims-b)."""
        if self.mode == "idle":
            now = self._rss()
            if busy and self._high is not None and now < self._high + BUSY_MIN_GROWTH_BYTES:
                return False
            if busy and self._high is None:  # the first ask under load learns where the heap stands
                self._high = now
                return False
            self._high = now if self._high is None else max(self._high, now)  # the level this trim hands back
        margin = self.min_growth_bytes
        if margin <= 0:
            return True
        now = self._rss()
        if self._floor is None or now - self._floor >= margin:
            return True
        self._floor = min(self._floor, now)
        return False

    def tick(self, busy: bool = False) -> None:
        if not self.due(busy):
            self.skipped += 1
            return
        self.trim_once()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            while self.idle is not None and not self._is_idle():
                if self._stop.wait(IDLE_POLL_S):
                    return
            try:
                self.tick()
            except Exception:  # never take the worker down for a memory courtesy
                log.exception("MorphServe: heap trim failed; stopping the trimmer")
                return

    def _is_idle(self) -> bool:
        try:
            return bool(self.idle())
        except Exception:  # a predicate that cannot answer never stops the trims
            return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def report(self) -> dict:
        return {"interval_s": self.interval_s, "min_growth_bytes": self.min_growth_bytes, "mode": self.mode,
                "running": self._thread is not None if self.mode == "thread" else self.available, "calls": self.calls, "skipped": self.skipped,
                "seconds": round(self.seconds, 4)}


_process_trimmer: HeapTrimmer | None = None  # this process's own (engine core or API server), at most one


def trim_this_process(interval_s: float, trim=None, idle=None) -> HeapTrimmer | None:
    """Start a thread that trims this process's heap every `interval_s` (the engine core's or
    the API server's, never a worker's: those trim at step boundaries). Either one keeps about
    30 MiB of heap freed after start-up (imports, the tokenizer, the engine's profiling run, the
    first requests) resident for its whole life, and between steps it frees little more, so a
    long interval hands that back at little cost: the thread runs wherever that process runs, and
    malloc_trim of a heap with nothing new to return takes about a millisecond. With `idle` (the
    frontend mode "idle") a due trim waits for a moment with no request in flight, so it never
    lands while the process serves: on 2 vCPUs the engine core's trims shared cores with the
    forward (docs/RESULTS.md, "dev-zen4-compiled-worker-quiet"). Once per process."""
    global _process_trimmer
    if interval_s <= 0 or _process_trimmer is not None:
        return _process_trimmer
    trimmer = HeapTrimmer(interval_s, trim=trim, mode="thread", idle=idle)
    if trimmer.start():
        trimmer.trim_once()  # the start-up heap goes now, not one interval later
        _process_trimmer = trimmer
        log.info("MorphServe: this process (pid %d) trims its own heap every %.0f s", os.getpid(), interval_s)
    return _process_trimmer
