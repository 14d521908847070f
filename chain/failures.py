"""Which failures are the infrastructure's and which are the event's: the one place that decides.

An **infrastructure** failure says nothing about the event: a service the run depends on was
away (the ledger's PostgreSQL, the results' Redis, the MQTT broker, the Prefect API, the data
centre's file server answering 5xx or not at all) or another run held the file too long. Such a
failure is waited for and retried where it happens (`ride_out`: the ledger, the result store),
and a run that still fails on one ends in a Failed state named `UNAVAILABLE`, which the recovery
(`worker/recovery.py`) schedules again as a whole, a bounded number of times, with the same
parameters (the same events: the same message ids).

An **event** failure is the event's own problem: a field that does not parse or validate
(`InvalidInput`, `ValidationFailed`), a file whose length or checksum is not the announced one
or that is missing (`DataMismatch`, an HTTP 4xx of its download), a message the broker refuses
(`PublishRefused`). Retrying cannot help: the run ends Failed with the event's JSON for an
operator to fix and replay. Anything not recognised as infrastructure is the event's (never
retried blindly).

`classify(exc)` walks the exception's causes (`__cause__`, `__context__`): a `LedgerUnavailable`
raised from a psycopg `OperationalError` is infrastructure either way. See
docs/operating/outages.md.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["infrastructure", "event"]

UNAVAILABLE = "Unavailable"  # name of the Failed state of a run failed on infrastructure

# HTTP statuses that say "the service, not the request": retried
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_infrastructure(exc: BaseException) -> bool | None:
    """True / False when this exception alone decides, None when it does not."""
    from chain.ledger_entry import ClaimLost, ClaimTimeout, LedgerUnavailable
    from chain.mqtt import MqttError, PublishRefused

    if isinstance(exc, PublishRefused):
        return False
    if isinstance(exc, LedgerUnavailable | ClaimLost | ClaimTimeout | MqttError):
        return True
    module = type(exc).__module__.split(".")[0]
    if module == "psycopg":
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    if module == "redis":
        import redis

        return isinstance(exc, redis.ConnectionError | redis.TimeoutError)
    if module in ("httpx", "httpcore", "prefect"):
        import httpx

        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in _TRANSIENT_STATUS
        if isinstance(exc, httpx.TransportError):
            return True
    if module == "sqlite3":
        import sqlite3

        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return None


def classify(exc: BaseException) -> Kind:
    """'infrastructure' (retried, the run scheduled again) or 'event' (final, for an operator)."""
    for cause in _causes(exc):
        decided = _is_infrastructure(cause)
        if decided is not None:
            return "infrastructure" if decided else "event"
    return "event"


def is_infrastructure(exc: BaseException) -> bool:
    return classify(exc) == "infrastructure"


def unavailable_message(exc: BaseException) -> str:
    """The message of the Failed state of a run failed on infrastructure (`UNAVAILABLE`)."""
    return (f"{type(exc).__name__}: {exc} -- a service was unavailable: the run is scheduled "
            "again (WIS2_RECOVERY_MAX_RETRIES)")[:2000]


def ride_out(operation: Callable[[], T], *, seconds: float, what: str,
             retry_if: Callable[[BaseException], bool] = is_infrastructure,
             on_retry: Callable[[BaseException], None] | None = None,
             first_delay: float = 0.5, max_delay: float = 5.0) -> T:
    """`operation()`, called again while it fails with an error `retry_if` accepts, with
    exponential backoff (jittered, `first_delay` doubling up to `max_delay`), for at most
    `seconds`; then that error is raised. `what` names the service in the warnings."""
    deadline = time.monotonic() + seconds
    delay = first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as exc:
            left = deadline - time.monotonic()
            if left <= 0 or not retry_if(exc):
                raise
            if on_retry is not None:
                on_retry(exc)
            pause = min(delay * (1 + random.uniform(0, 0.25)), left)
            log.warning("%s unavailable (attempt %d: %s); retrying in %.1f s, for %.0f s more",
                        what, attempt, str(exc).strip().splitlines()[0] if str(exc).strip()
                        else type(exc).__name__, pause, left)
            time.sleep(pause)
            delay = min(delay * 2, max_delay)
