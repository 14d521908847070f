"""A backfill gives way to live runs (flows/live_priority.py): it waits while live runs are
found, never longer than its limit, and never because the count failed."""

from __future__ import annotations

from flows.live_priority import LOOK_SECONDS, give_way


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_no_live_run_no_wait() -> None:
    time = FakeTime()
    assert give_way(10, count=lambda: 0, clock=time.clock, sleep=time.sleep) == 0


def test_waits_until_the_live_runs_are_done() -> None:
    time = FakeTime()
    live = iter([2, 1, 1, 0])
    waited = give_way(10, count=lambda: next(live), clock=time.clock, sleep=time.sleep)
    assert waited == 3 * LOOK_SECONDS


def test_never_longer_than_the_limit() -> None:
    time = FakeTime()
    assert give_way(1.0, count=lambda: 5, clock=time.clock, sleep=time.sleep) == 1.0


def test_zero_turns_it_off_and_a_failed_count_lets_the_batch_go() -> None:
    time = FakeTime()

    def broken() -> int:
        raise ConnectionError("API unavailable")

    assert give_way(0, count=lambda: 5, clock=time.clock, sleep=time.sleep) == 0
    assert give_way(10, count=broken, clock=time.clock, sleep=time.sleep) == 0
