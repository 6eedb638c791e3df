"""The background restore preparer: order, the memory allowance, errors and cancellation
(pure logic with a fake prepare; the real engine is exercised in test_swap_identity)."""

from __future__ import annotations

import threading
import time

from quant_layers.restore_prep import LayerCost, RestorePreparer

COST = LayerCost(new_bytes=100, old_bytes=30)  # the shrink frees 70 per uncommitted layer


def _drain(prep: RestorePreparer, timeout: float = 5.0) -> list[int]:
    order, deadline = [], time.monotonic() + timeout
    while prep.remaining and time.monotonic() < deadline:
        order += [i for i, _ in prep.take_ready()]
        time.sleep(0.001)
    return order


def test_commits_every_layer_in_restore_order():
    layers = [7, 3, 12, 0]
    prep = RestorePreparer(layers, {i: COST for i in layers}, prepare=lambda i: f"bf16-{i}")
    assert _drain(prep) == layers
    prep.cancel()


def test_prepared_bytes_never_exceed_what_the_shrink_freed_beyond_one_layer():
    layers = list(range(10))
    peak = {"held": 0, "over": []}
    lock = threading.Lock()
    prep = None

    def prepare(i):
        with lock:
            held = prep.prepared_bytes() + COST.new_bytes if prep else COST.new_bytes
            freed = 70 * prep.remaining if prep else 700
            if held > max(freed, COST.new_bytes):
                peak["over"].append((i, held, freed))
            peak["held"] = max(peak["held"], held)
        return i

    prep = RestorePreparer(layers, {i: COST for i in layers}, prepare)
    time.sleep(0.2)  # nothing taken: the thread must stop at the allowance
    assert prep.prepared_bytes() <= 700
    assert _drain(prep) == layers
    assert not peak["over"], peak["over"]
    prep.cancel()


def _settles_at(prep: RestorePreparer, expected: int) -> bool:
    """The preparer's thread reaches `expected` prepared bytes (polled, not after a fixed
    sleep: a loaded machine may run the thread late) and goes no further."""
    deadline = time.monotonic() + 5
    while prep.prepared_bytes() < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time to overshoot, had the allowance let it
    return prep.prepared_bytes() == expected


def test_a_compression_prepares_only_what_its_committed_layers_freed_beyond_one_layer():
    """bf16 (100) -> int8 (50): the KV pool grows only when the move is done, so each
    committed layer's 50 freed bytes are what pays for layers prepared ahead."""
    cost = LayerCost(new_bytes=50, old_bytes=100)
    layers = list(range(8))
    prep = RestorePreparer(layers, {i: cost for i in layers}, prepare=lambda i: i)
    assert _settles_at(prep, 50)  # nothing committed yet: one layer ahead, no more
    assert [i for i, _ in prep.take_ready()] == [0]
    assert _settles_at(prep, 50)  # one committed layer freed 50: still one held
    assert [i for i, _ in prep.take_ready()] == [1]
    assert _settles_at(prep, 100)  # two committed: 100 freed, two held
    assert [i for i, _ in prep.take_ready()] == [2, 3]
    assert _settles_at(prep, 200)  # four committed: the other four
    assert _drain(prep) == list(range(4, 8))
    prep.cancel()


def test_an_error_is_reported_and_stops_preparing():
    def prepare(i):
        if i == 2:
            raise OSError("model file vanished")
        return i

    prep = RestorePreparer([0, 1, 2, 3], {i: COST for i in range(4)}, prepare)
    deadline = time.monotonic() + 5
    taken = []
    while prep.error is None and time.monotonic() < deadline:
        taken += [i for i, _ in prep.take_ready()]
        time.sleep(0.001)
    taken += [i for i, _ in prep.take_ready()]
    assert isinstance(prep.error, OSError) and taken == [0, 1]
    prep.cancel()


class _Compute:
    def __init__(self, layer):
        self.layer, self.released = layer, False

    def release(self):
        self.released = True


def test_cancel_during_a_blocked_prepare_returns_at_once_and_the_thread_frees_its_layer():
    """The engine thread cancels while layer 1's read is stuck (a cold read): cancel must not
    wait for it; the layer's bytes stay counted until the thread has freed what it built."""
    gate, in_prepare, built = threading.Event(), threading.Event(), []

    def prepare(i):
        compute = _Compute(i)
        built.append(compute)
        if i == 1:
            in_prepare.set()
            gate.wait(10)
        return compute

    prep = RestorePreparer([0, 1, 2], {i: COST for i in range(3)}, prepare)
    assert in_prepare.wait(5)
    started = time.monotonic()
    prep.cancel()
    # a cancel that waited for the thread would take the gate's 10 s; 5 s leaves a loaded machine room
    assert time.monotonic() - started < 5, "cancel waited for the preparing thread"
    assert not prep.finished and prep.prepared_bytes() == COST.new_bytes  # layer 1, still held
    assert built[0].released  # prepared before the cancel, never installed: freed by cancel
    gate.set()
    prep.join(5)
    assert prep.finished and prep.prepared_bytes() == 0 and prep.take_ready() == []
    assert [c.layer for c in built] == [0, 1] and all(c.released for c in built)


def test_a_proof_that_fails_at_commit_installs_nothing_from_that_layer_on():
    """Background computes are proved on the engine's thread as they are installed: a layer
    whose proof fails stays as it was, it and the layers taken with it are released once,
    the move stops with the error, and the layers installed before it stay installed."""
    from morphserve.runtime.layer_set import LayerSet
    from quant_layers.swappable import ProofFailed

    class Compute:
        def __init__(self):
            self.released = 0

        def release(self):
            self.released += 1

    class Swap:
        fp_bytes = 100

        def __init__(self, bad: bool):
            self.bad, self.tier, self.installed = bad, "bf16", None

        @property
        def quantized(self):
            return self.tier != "bf16"

        def prove(self, compute, release_on_failure=True):
            if self.bad:
                raise ProofFailed("returned non-finite values on its proof call")

        def commit(self, tier, compute):
            self.tier, self.installed = tier, compute

    layers = {0: [Swap(False)], 1: [Swap(True)], 2: [Swap(False)]}
    computes = {i: [Compute()] for i in layers}
    ls = LayerSet.__new__(LayerSet)
    ls.layers, ls.finishing, ls.restore_targets = layers, [], {i: "w8a8" for i in layers}
    ls.restore = RestorePreparer([0, 1, 2], {i: LayerCost(new_bytes=10, old_bytes=100) for i in layers},
                                 prepare=lambda i: computes[i])
    deadline = time.monotonic() + 5
    while ls.restore_ready() < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    first = ls.restore_commit(limit=1)
    assert first["committed"] == [0] and first["error"] is None and layers[0][0].installed is computes[0][0]
    while ls.restore_ready() < 2 and time.monotonic() < deadline:  # layer 0's 90 freed bytes hold both
        time.sleep(0.001)
    second = ls.restore_commit()
    assert second["committed"] == [] and "non-finite" in second["error"] and ls.restore is None
    assert layers[1][0].tier == layers[2][0].tier == "bf16" and second["tiers"] == {"0": "w8a8"}
    assert [computes[i][0].released for i in range(3)] == [0, 1, 1]
