from tests.harness import FakeClock
from vncgate.front.throttle import FailureThrottle


def test_burst_then_refill_per_address():
    clock = FakeClock()
    throttle = FailureThrottle(burst=3, per_second=0.5, clock=clock)
    for _ in range(3):
        assert throttle.allowed("10.0.0.1")
        throttle.failed("10.0.0.1")
    assert not throttle.allowed("10.0.0.1")
    assert throttle.allowed("10.0.0.2")  # other addresses are not slowed
    clock.advance(1.9)
    assert not throttle.allowed("10.0.0.1")
    clock.advance(0.1)  # 2 s at 0.5/s: one attempt back
    assert throttle.allowed("10.0.0.1")
    throttle.failed("10.0.0.1")
    assert not throttle.allowed("10.0.0.1")
    clock.advance(100)
    assert throttle.allowed("10.0.0.1")


def test_memory_is_bounded():
    clock = FakeClock()
    throttle = FailureThrottle(burst=2, per_second=1, clock=clock, max_addresses=100)
    for number in range(1000):
        throttle.failed(f"10.0.{number // 250}.{number % 250}")
    assert len(throttle._buckets) <= 100
    throttle.failed("10.9.9.9")
    assert throttle.allowed("10.9.9.9") and not (throttle.failed("10.9.9.9") or throttle.allowed("10.9.9.9"))


def test_take_is_a_request_rate_limit_per_key():
    clock = FakeClock()
    limit = FailureThrottle(burst=2, per_second=0.5, clock=clock)
    assert [limit.take("ops"), limit.take("ops"), limit.take("ops")] == [True, True, False]
    assert limit.take("panel")  # each key has its own bucket
    clock.advance(2)  # one request back
    assert [limit.take("ops"), limit.take("ops")] == [True, False]
