"""Adaptive batching: which events may be grouped now, and collecting a burst.

A worker that takes a message while others are queued behind it collects the valid ones (up to
`batch_max_size`, waiting at most `batch_max_wait` for more), grouped by route, for ONE run of
the route's `batch_deployment` each. A message on an idle listener gets a run of its own at once.
A batch deployment found missing is not tried again for `BATCH_RECHECK` seconds (its route's
bursts get one run per event meanwhile).

Opt-in (`batch_hold_waiting_runs` > 0): while the chain is behind (`Backlog`: that many of the
listener's runs wait Scheduled, read from the API at most every `BACKLOG_RECHECK` s), a batch
that is not full at `batch_max_wait` is held until it is, for at most `batch_hold_max` s (a run
costs the Prefect server and the worker a fixed price whatever its size). The events held stay
unacknowledged, in the broker's database: off for the node's own broker, which writes that
database out on every change (docs/concepts/batches.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from listener.messages import Accepted, Inbound
from listener.settings import Route
from listener.stopping import StopSignal

log = logging.getLogger("listener")

BATCH_RECHECK = 60  # seconds before a missing batch deployment is looked up again
COLLECT_POLL = 0.005  # seconds between looks at the queue while a batch fills
BACKLOG_RECHECK = 0.5  # seconds the count of waiting runs is kept


class BatchPolicy:
    """Whether the events of a route may be grouped now (batch deployments known missing)."""

    def __init__(
        self, max_size: int, recheck: float = BATCH_RECHECK,
        clock: Callable[[], float] = time.monotonic, runs_per_call: int = 1,
    ) -> None:
        self.max_size = max_size
        self.runs_per_call = runs_per_call  # batch runs created by one API call (bulk)
        self.recheck = recheck
        self._clock = clock
        self._missing: dict[str, float] = {}  # batch deployment -> when found missing

    def allows(self, route: Route) -> bool:
        deployment = route.batch_deployment
        if self.max_size < 2 or deployment is None:
            return False
        missing_since = self._missing.get(deployment)
        return missing_since is None or self._clock() - missing_since > self.recheck

    def missing(self, deployment: str, exc: Exception) -> None:
        """`deployment` was not found: no batches for it during `recheck` seconds."""
        if deployment not in self._missing:
            log.warning("batch deployment missing: bursts get one run per event until it is "
                        "deployed", extra={"deployment": deployment, "error": str(exc),
                                           "recheck_in": self.recheck})
        self._missing[deployment] = self._clock()

    def found(self, deployment: str) -> None:
        self._missing.pop(deployment, None)

    @property
    def collect_size(self) -> int:
        """Most events a worker collects from a burst: `runs_per_call` batches."""
        return self.max_size * self.runs_per_call

    def split(self, members: list[Accepted]) -> list[list[Accepted]]:
        """`members` (one route) in batches of at most `max_size`, in order."""
        size = max(1, self.max_size)
        return [members[i:i + size] for i in range(0, len(members), size)]


class Backlog:
    """Whether the chain is behind: at least `threshold` of the listener's runs wait Scheduled
    (`count`, read at most every `recheck` s; the last count is `waiting`). A count that fails
    says "not behind" (nothing is held on a guess). `threshold` 0: never behind."""

    def __init__(self, threshold: int, count: Callable[[], Awaitable[int]],
                 recheck: float = BACKLOG_RECHECK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.recheck = recheck
        self.waiting = 0
        self.held = 0  # events of the batch held now (0: none)
        self._count = count
        self._clock = clock
        self._read_at = float("-inf")

    async def behind(self) -> bool:
        if self.threshold <= 0:
            return False
        if self._clock() - self._read_at >= self.recheck:
            self._read_at = self._clock()
            try:
                self.waiting = await self._count()
            except Exception as exc:
                log.debug("cannot count the waiting runs: %s", exc)
                self.waiting = 0
        return self.waiting >= self.threshold


def by_route(members: list[Accepted]) -> list[list[Accepted]]:
    """`members` grouped by route (same route object), in order of first appearance."""
    groups: dict[int, list[Accepted]] = {}
    for member in members:
        groups.setdefault(id(member.route), []).append(member)
    return list(groups.values())


async def collect(
    first: Accepted, queue: asyncio.Queue[Inbound | None],
    accept: Callable[[Inbound], Awaitable[Accepted | None]], *, max_size: int,
    max_wait: float, stop: StopSignal, backlog: Backlog | None = None, max_hold: float = 0.0,
) -> list[Accepted]:
    """`first` and the valid messages queued behind it (waiting at most `max_wait` for more,
    or while `backlog` is behind up to `max_hold`), up to `max_size`; `accept` dead-letters
    the malformed ones on the way (returning None)."""
    taken = [first]
    start = time.monotonic()
    deadline = start + max_wait
    held_until = start + max_hold
    try:
        while len(taken) < max_size and not stop.requested:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if (backlog is None or time.monotonic() >= held_until
                            or not await backlog.behind()):
                        break
                    backlog.held = len(taken)
                    deadline = min(held_until, time.monotonic() + backlog.recheck)
                    continue
                await asyncio.sleep(min(COLLECT_POLL, remaining))
                continue
            if item is None:  # the stop signal is for a worker: hand it back
                queue.put_nowait(None)
                break
            accepted = await accept(item)
            if accepted is not None:
                taken.append(accepted)
                if backlog is not None and backlog.held:
                    backlog.held = len(taken)
    finally:
        if backlog is not None:
            backlog.held = 0
    return taken
