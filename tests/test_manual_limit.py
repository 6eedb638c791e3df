"""The manual rate limit's arithmetic: calls inside the interval wait, and slow transitions
buy proportionally longer waits (pure logic)."""

from morphserve.runtime.manual_limit import SHARE_INVERSE, ManualRateLimit


def test_a_quick_transition_waits_out_the_interval_from_its_start():
    limit = ManualRateLimit(1.0)
    assert limit.wait_s(100.0) <= 0
    limit.charge(100.0, 100.05)
    assert limit.wait_s(100.5) == 0.5
    assert limit.wait_s(101.0) <= 0


def test_a_slow_transition_holds_manual_changes_to_a_tenth_of_the_engine_time():
    limit = ManualRateLimit(1.0)
    limit.charge(100.0, 100.4)  # a 0 <-> top transition of 0.4 s
    assert limit.wait_s(101.0) > 0  # counting calls alone would allow this one
    assert abs(limit.wait_s(100.4) - SHARE_INVERSE * 0.4) < 1e-9
    # a caller looping at the limit: transition time / wall time stays <= 1 / (1 + SHARE_INVERSE)
    now, busy = 200.0, 0.0
    for _ in range(50):
        now += max(0.0, limit.wait_s(now))
        limit.charge(now, now + 0.4)
        now, busy = now + 0.4, busy + 0.4
    assert busy / (limit.open_at - 200.0) <= 1 / (1 + SHARE_INVERSE) + 1e-9  # through the last hold


def test_an_interval_of_zero_turns_the_limit_off():
    limit = ManualRateLimit(0.0)
    limit.charge(100.0, 105.0)
    assert limit.wait_s(105.0) == 0
