"""The evaluation's memory sampler: when it reads smaps (the costly part), and that it
samples a real process group at its own low priority."""

import os
import threading
import time

from morphserve.evaluation.runner import BREAKDOWN_STEP, SAMPLER_NICE, MemorySampler

MIB = 2**20


def test_breakdown_needs_a_new_high_and_the_interval():
    s = MemorySampler(pgid=0, breakdown_every_s=10.0)
    assert s.breakdown_due(100 * MIB, now=0.0)  # nothing read yet
    s.at_peak, s.last_breakdown = {"total": 100 * MIB}, 0.0
    assert not s.breakdown_due(100 * MIB + BREAKDOWN_STEP, now=5.0)  # a new high, too soon
    assert not s.breakdown_due(100 * MIB + BREAKDOWN_STEP - 1, now=50.0)  # in time, not high enough
    assert s.breakdown_due(100 * MIB + BREAKDOWN_STEP, now=10.0)


def test_samples_a_real_group_at_low_priority():
    seen = {}

    class Probe(MemorySampler):
        def _breakdown(self, pids):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            return super()._breakdown(pids)

    before = os.getpriority(os.PRIO_PROCESS, 0)
    s = Probe(os.getpgid(0), every=0.01)
    s.start()
    # at nice 19 the thread gets a core only when nothing else wants one: under make test's two
    # busy workers on two cores its first whole-group reading took over 0.3 s, so wait for the
    # samples (up to a generous deadline) rather than a fixed time
    deadline = time.monotonic() + 30.0
    while s.samples < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.stop.set()
    s.join(timeout=5)
    assert s.samples >= 3 and s.peak["total"] > 0
    assert s.at_peak["total"] > 0 and s.at_peak["by_process"]  # the first sample is a new high
    assert seen["nice"] == max(before, SAMPLER_NICE)  # its own thread lowered (never raised)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the calling thread untouched
