"""Wake a worker as soon as a flow run is scheduled in its pool, from the server's event stream.

A Prefect worker finds new runs by polling its pool every `PREFECT_WORKER_QUERY_SECONDS`: a run
created just after a poll waits for the next one (half an interval on average). The Prefect server
also streams its events on a websocket (`/api/events/out`): `prefect.flow-run.Scheduled` (and
`Recovering`, `AwaitingRetry`, the other Scheduled-type states a run of a pool can enter) names
the run's work pool among its related resources. `PoolWakeup` listens to that stream and calls
`wake()` for each such event of its pool; the `wis2-warm` worker then polls at once
(`worker/warm.py`). The poll stays the fallback: the stream is an accelerator only.

- The subscription uses the process's Prefect settings (`PREFECT_API_URL`, and
  `PREFECT_API_AUTH_STRING`, sent in the stream's own authentication message).
- A lost stream (server restart, a proxy that does not pass websockets, an error) is never an
  error of the worker: `run()` logs it, waits (1 s, doubling up to `MAX_RETRY_DELAY`) and
  connects again; it returns only when cancelled. After each (re)connection it wakes the worker
  once: runs scheduled while the stream was down are taken without waiting for the poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.events.schemas.events import Event

log = logging.getLogger(__name__)

# Scheduled-type states a run of a pool enters before a worker takes it (state name = event name)
WAKE_EVENTS = ("prefect.flow-run.Scheduled", "prefect.flow-run.Recovering",
               "prefect.flow-run.AwaitingRetry")
FIRST_RETRY_DELAY, MAX_RETRY_DELAY = 1.0, 30.0  # seconds between two connection attempts
RECONNECTION_ATTEMPTS = 2  # the subscriber's own quick retries before ours (with a delay)


def pool_of(event: Event) -> str | None:
    """The name of the work pool an event's flow run belongs to (None: no pool)."""
    for related in event.related:
        if related.get("prefect.resource.role") == "work-pool":
            return related.get("prefect.resource.name")
    return None


class PoolWakeup:
    """Calls `wake(flow_run_resource_id)` for each run scheduled in `pool_name` (see module)."""

    def __init__(self, pool_name: str, wake: Callable[[str], None],
                 logger: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> None:
        self.pool_name = pool_name
        self._wake = wake
        self._log = logger or log  # the worker's own logger: its lines appear in its output
        self.connected = asyncio.Event()  # set while the stream is connected

    def _event_filter(self) -> Any:
        from prefect.events.filters import EventFilter, EventNameFilter

        # The server filters by name; the pool is checked here (a related-resource filter is not
        # applied by the server to the live stream in Prefect 3.9).
        return EventFilter(event=EventNameFilter(name=list(WAKE_EVENTS)))

    async def run(self) -> None:
        """Listen until cancelled; reconnect after any failure (see module)."""
        from prefect.events.clients import get_events_subscriber

        delay, reported = FIRST_RETRY_DELAY, False
        while True:
            try:
                async with get_events_subscriber(
                        filter=self._event_filter(), reconnection_attempts=RECONNECTION_ATTEMPTS,
                        reconnect_on_clean_close=True) as subscriber:
                    self.connected.set()
                    self._log.info("event stream connected: runs scheduled in pool %r are taken at "
                             "once (the poll stays the fallback)", self.pool_name)
                    delay, reported = FIRST_RETRY_DELAY, False
                    self._wake("")  # runs scheduled while the stream was down
                    async for event in subscriber:
                        if pool_of(event) == self.pool_name:
                            self._wake(event.resource.id)
                    self._log.info("event stream closed by the server; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost stream only means waiting for the poll
                # first failure in a row: INFO; the next ones: DEBUG (no log flood while down)
                self._log.log(logging.DEBUG if reported else logging.INFO,
                        "event stream unavailable (%s: %s); runs are taken by the poll, "
                        "reconnecting in %.0f s", type(exc).__name__, exc, delay)
                reported = True
            finally:
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
