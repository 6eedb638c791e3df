"""Moves prepared off the critical path: read + fuse + prepack in a background thread,
installed by the engine's own thread at step boundaries. Built for restores, and used the
same way for compressions (bf16 -> W8A8: vLLM's int8 handle creation reorders every
weight, about 0.4 s for all 30 SmolLM2 layers on one core, a stall no decode step should pay).

A restore on CPU is dominated by vLLM's bf16 prepack (about 4-7 ms per SmolLM2 layer), so
restoring 30 layers inside one step boundary stalls decoding for several steps. Here a
worker thread prepares layer after layer while the model keeps running them in W4; at each
step boundary `take_ready()` hands over whole layers, which the caller installs (a pointer
swap). The thread only builds new objects; it never touches a layer.

Memory: a prepared layer holds its new computes *and* its still-live old ones until it is
committed. The bytes that pay for them: for a restore, the KV shrink has already released
(new - old) bytes for every uncommitted layer; for a compression, the KV pool grows only
once the move is done, so every committed layer has freed (old - new) bytes nobody uses
yet. The thread prepares a layer only while the prepared-but-not-committed bytes stay
within those, so the budget holds throughout; when nothing is prepared it may always
prepare one layer (the synchronous path has the same one-layer transient).

Cancelling never waits for the thread: `cancel` runs on the engine's thread, and the layer
being prepared may be a cold read of tens of milliseconds (seconds on a large model). The
thread finishes that one layer on its own, frees what it built, and stops; until then its
bytes stay counted (`prepared_bytes`), so the budget check still sees them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class LayerCost:
    new_bytes: int  # the layer's weights in the tier it moves to
    old_bytes: int  # the same as they compute now


class RestorePreparer:
    def __init__(self, layers: list[int], costs: dict[int, LayerCost], prepare: Callable[[int], object],
                 thread_init: Callable[[], None] | None = None):
        """`prepare(layer)` returns whatever the caller needs to commit that layer;
        `thread_init` runs first on the preparing thread (e.g. to cap its intra-op threads)."""
        self._thread_init = thread_init
        self.order = list(layers)
        self.costs = costs
        self._prepare = prepare
        self._cond = threading.Condition()
        self._ready: dict[int, object] = {}
        self._uncommitted = set(layers)
        self._committed: set[int] = set()
        self._in_flight: int | None = None  # the layer the thread is preparing now
        self._cancelled = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="morphserve-restore", daemon=True)
        self._thread.start()

    def _allowed(self, layer: int) -> bool:
        if not self._ready:
            return True
        held = sum(self.costs[i].new_bytes for i in self._ready) + self.costs[layer].new_bytes
        shrunk = sum(max(0, self.costs[i].new_bytes - self.costs[i].old_bytes) for i in self._uncommitted)
        freed = sum(max(0, self.costs[i].old_bytes - self.costs[i].new_bytes) for i in self._committed)
        return held <= shrunk + freed

    def _run(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        for layer in self.order:
            with self._cond:
                self._cond.wait_for(lambda: self._cancelled or self._allowed(layer))
                if self._cancelled:
                    return
                self._in_flight = layer
            try:
                prepared = self._prepare(layer)
            except BaseException as e:  # reported to the engine thread at the next boundary
                with self._cond:
                    self.error, self._in_flight = e, None
                return
            with self._cond:
                cancelled = self._cancelled
                if not cancelled:
                    self._ready[layer] = prepared
            if cancelled:  # built after the cancel: never installed, freed here
                release_computes([prepared])
            with self._cond:
                self._in_flight = None
                if cancelled:
                    return

    def ready_count(self) -> int:
        """How many layers take_ready would hand over now."""
        with self._cond:
            n = 0
            for layer in self.order:
                if layer in self._ready:
                    n += 1
                elif layer in self._uncommitted:
                    break
            return n

    def take_ready(self, limit: int | None = None) -> list[tuple[int, object]]:
        """The prepared layers, in restore order, that can be committed now (at most `limit`)."""
        with self._cond:
            taken = []
            for layer in self.order:
                if limit is not None and len(taken) >= limit:
                    break
                if layer in self._ready:
                    taken.append((layer, self._ready.pop(layer)))
                    self._uncommitted.discard(layer)
                    self._committed.add(layer)
                elif layer in self._uncommitted:
                    break  # commit in order: LIFO restores stay LIFO
            self._cond.notify_all()
            return taken

    @property
    def remaining(self) -> int:
        with self._cond:
            return len(self._uncommitted)

    def cancel(self) -> None:
        """Drop every prepared layer; returns at once (see the module docstring)."""
        with self._cond:
            self._cancelled = True
            dropped = list(self._ready.values())
            self._ready.clear()
            self._cond.notify_all()
        release_computes(dropped)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def prepared_bytes(self) -> int:
        """Bytes prepared and not yet committed (held beside the layers' live tensors),
        and, once cancelled, the layer the thread is still finishing."""
        with self._cond:
            held = sum(self.costs[i].new_bytes for i in self._ready)
            if self._cancelled and self._in_flight is not None:
                held += self.costs[self._in_flight].new_bytes
            return held


def release_computes(prepared: list) -> None:
    """Free the native state of computes that will never be installed."""
    for item in prepared:
        for compute in item if isinstance(item, list) else [item]:
            if hasattr(compute, "release"):
                compute.release()
