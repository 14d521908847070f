"""What a process knows of the Prefect API's outages, for the recovery's judgement of workers.

No worker's heartbeat reaches an unavailable API, and one sent during an outage waits in its
client's retry backoff for a while after it: a worker's silence then says nothing about the
worker. `ApiOutages` is one process's view: an outage is seen when a call of the process to the
API (a poll, a heartbeat, a recovery look) fails, or has waited longer than `slow_call` seconds
(the client retried it through the outage): from then on while it still waits, and when it
ends. `LookOutages` adds one recovery look's own reads and is asked at each of the look's
decisions, never once at its start: a look whose reads waited through an outage of the
PostgreSQL under the Prefect server decided with the view of its start and rescheduled a live
worker's run (`worker/recovery.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime


def _now() -> datetime:
    return datetime.now(UTC)


class ApiOutages:
    """One process's view of the API's outages (calls that failed or waited too long)."""

    def __init__(self, slow_call: float) -> None:
        self.slow_call = slow_call
        self.last: datetime | None = None  # the API last found unavailable
        self._calls: dict[int, float] = {}  # calls under way: their start (monotonic)

    def saw(self) -> None:
        """The API was found unavailable now (a call failed, or took so long that the client
        must have retried it through an outage)."""
        self.last = _now()

    @contextmanager
    def call(self) -> Iterator[None]:
        """Around a call of the process to the API: one that takes over `slow_call` seconds is
        being retried through an outage, seen from then on while it waits (`end`) and when it
        ends."""
        token = object()
        self._calls[id(token)] = time.monotonic()
        try:
            yield
        finally:
            started = self._calls.pop(id(token))
            if time.monotonic() - started > self.slow_call:
                self.saw()

    def end(self) -> datetime | None:
        """When the API was last found unavailable: now while a call has been waiting for it
        for over `slow_call` seconds (still in its client's retries), else when a call last
        failed or ended slow (`saw`); None: never."""
        if any(time.monotonic() - started > self.slow_call
               for started in list(self._calls.values())):
            return _now()
        return self.last


class LookOutages:
    """One recovery look's view: the process's (`process_view()`, asked at each decision) and
    the look's own reads, which waited in the client's retries when they were slow."""

    def __init__(self, slow_call: float,
                 process_view: Callable[[], datetime | None] = lambda: None) -> None:
        self.slow_call = slow_call
        self._process_view = process_view
        self._started = time.monotonic()
        self._seen: datetime | None = None

    def read(self, started: float | None = None) -> None:
        """The reads since `started` (monotonic; default: the look's start) are done: slow, an
        outage seen now."""
        if time.monotonic() - (self._started if started is None else started) > self.slow_call:
            self._seen = _now()

    def end(self) -> datetime | None:
        seen = [t for t in (self._seen, self._process_view()) if t is not None]
        return max(seen) if seen else None


__all__ = ["ApiOutages", "LookOutages"]
