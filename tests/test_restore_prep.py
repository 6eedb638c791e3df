"""The background restore preparer: order, the memory allowance, errors and cancellation
(pure logic with a fake prepare; the real engine is exercised in test_swap_identity)."""

from __future__ import annotations

import threading
import time

from quant_layers.restore_prep import LayerCost, RestorePreparer

COST = LayerCost(bf16_bytes=100, w4_bytes=30)  # the shrink frees 70 per uncommitted layer


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
            held = prep.prepared_bytes() + COST.bf16_bytes if prep else COST.bf16_bytes
            freed = 70 * prep.remaining if prep else 700
            if held > max(freed, COST.bf16_bytes):
                peak["over"].append((i, held, freed))
            peak["held"] = max(peak["held"], held)
        return i

    prep = RestorePreparer(layers, {i: COST for i in layers}, prepare)
    time.sleep(0.2)  # nothing taken: the thread must stop at the allowance
    assert prep.prepared_bytes() <= 700
    assert _drain(prep) == layers
    assert not peak["over"], peak["over"]
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


def test_cancel_drops_prepared_layers_and_stops_the_thread():
    gate = threading.Event()
    prep = RestorePreparer([0, 1, 2], {i: COST for i in range(3)}, lambda i: gate.wait(5) and i)
    prep.cancel() if gate.set() is None else None
    assert prep.take_ready() == [] and prep.prepared_bytes() == 0
    assert not prep._thread.is_alive()
