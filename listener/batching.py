"""Adaptive batching: which events may be grouped now, and collecting a burst.

A worker that takes a message while others are queued behind it collects the valid ones (up to
`batch_max_size`, waiting at most `batch_max_wait` for more), grouped by route, for ONE run of
the route's `batch_deployment` each. A message on an idle listener gets a run of its own at once.
A batch deployment found missing is not tried again for `BATCH_RECHECK` seconds (its route's
bursts get one run per event meanwhile).
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


def by_route(members: list[Accepted]) -> list[list[Accepted]]:
    """`members` grouped by route (same route object), in order of first appearance."""
    groups: dict[int, list[Accepted]] = {}
    for member in members:
        groups.setdefault(id(member.route), []).append(member)
    return list(groups.values())


async def collect(
    first: Accepted, queue: asyncio.Queue[Inbound | None],
    accept: Callable[[Inbound], Awaitable[Accepted | None]], *, max_size: int,
    max_wait: float, stop: StopSignal,
) -> list[Accepted]:
    """`first` and the valid messages queued behind it (waiting at most `max_wait` for more),
    up to `max_size`; `accept` dead-letters the malformed ones on the way (returning None)."""
    taken = [first]
    deadline = time.monotonic() + max_wait
    while len(taken) < max_size and not stop.requested:
        try:
            item = queue.get_nowait()
        except asyncio.QueueEmpty:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(COLLECT_POLL, remaining))
            continue
        if item is None:  # the stop signal is for a worker: hand it back
            queue.put_nowait(None)
            break
        accepted = await accept(item)
        if accepted is not None:
            taken.append(accepted)
    return taken
