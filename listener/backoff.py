"""Calls to the Prefect API retried with exponential back-off while it is unavailable.

While the API is down nothing is acknowledged, so the broker keeps the rest queued; the other
workers wait (`ok`) instead of piling on. A busy answer (503) is first tried again quickly
(`busy_retries`, from `busy_retry_delay` doubling): on SQLite a run creation that met another
transaction's write gets one, and a second later (the back-off's first delay) was most of a
steady event's latency there. At most `api_concurrency` calls run at the same time.
On a stop request a call still failing gives up and leaves its messages unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from listener.messages import Inbound
from listener.observability import Metrics
from listener.runs import ApiBusy, ApiRejected, ApiUnavailable, DeploymentMissing, RunCreated
from listener.settings import ListenerSettings
from listener.stopping import StopSignal

log = logging.getLogger("listener")


def backoff_delays(min_delay: float, max_delay: float) -> Iterator[float]:
    """The waits before each retry (before jitter): doubling from `min_delay` up to `max_delay`."""
    delay = min_delay
    while True:
        yield min(delay, max_delay)
        delay = min(delay * 2, max_delay)


class ApiBackoff:
    """Runs API calls with back-off; `status` is the API's state for /healthz."""

    def __init__(
        self, settings: ListenerSettings, metrics: Metrics, stop: StopSignal,
        abandon: Callable[[Inbound], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stop = stop
        self.abandon = abandon
        self.status = "unknown"
        self.ok = asyncio.Event()  # cleared while the API is unavailable
        self.ok.set()
        self._gate = asyncio.Semaphore(settings.api_concurrency)

    async def call(
        self, call: Callable[[], Awaitable[RunCreated]], items: list[Inbound],
        context: dict[str, Any], *, retry_missing: bool = True,
    ) -> RunCreated | None:
        """`call()` retried with backoff while the API is unavailable; None when stopping (the
        items are then left unacknowledged). `ApiRejected` (and `DeploymentMissing` when not
        `retry_missing`) are raised to the caller."""
        delays = backoff_delays(self.settings.retry_min_delay, self.settings.retry_max_delay)
        quick = backoff_delays(self.settings.busy_retry_delay, self.settings.retry_min_delay)
        quick_left = self.settings.busy_retries
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._gate:
                    result = await call()
            except ApiRejected:
                self.ok.set()
                raise
            except ApiUnavailable as exc:
                missing = isinstance(exc, DeploymentMissing)
                if missing and not retry_missing:
                    raise
                self.metrics.api_errors.inc()
                if isinstance(exc, ApiBusy) and quick_left > 0 and not self.stop.requested:
                    quick_left -= 1
                    wait = next(quick) * random.uniform(1.0, 1.25)
                    log.debug("Prefect API busy; trying again", extra={
                        **context, "attempt": attempt, "retry_in": round(wait, 3)})
                    await self.stop.sleep(wait)
                    continue
                if not missing:
                    self.status = f"unavailable: {exc}"
                    self.ok.clear()  # the other workers wait instead of piling on
                if self.stop.requested:
                    log.warning("API unavailable while stopping: left unacknowledged for the "
                                "next session", extra={**context, "error": str(exc)})
                    for item in items:
                        self.abandon(item)
                    return None
                wait = next(delays) * random.uniform(1.0, 1.25)
                log.warning("Prefect API unavailable; retrying", extra={
                    **context, "attempt": attempt, "retry_in": round(wait, 2),
                    "error": str(exc)})
                await self.stop.sleep(wait)
                continue
            self.status = "ok"
            self.ok.set()
            return result
