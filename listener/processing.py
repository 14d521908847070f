"""The workers on the asyncio loop: each takes a message from the queue, checks it (a bad one goes
to the dead-letter store), then creates its run at once when the listener is idle (nothing
queued behind it, and no message taken within `batch_max_wait` before it), or collects the burst
or the stream behind it into batch runs. A `None` in the queue stops one worker.

Why a stream counts as busy: at a sustained rate (say 20 events/s) the queue is empty most of
the time, since the workers take each message as it comes; judged by the queue alone, most events
would get a run of their own, and a run costs the Prefect server a fixed price whatever its size
(`make bench --soak`: 20 events/s made about six single-event runs a second, and the 2-core node
fell behind at 5 events/s). An event that comes after a quiet spell longer than `batch_max_wait`
still gets its run at once (steady low rates: no added latency).

One worker takes from the queue at a time (`taking`), and keeps that turn while it collects: the
runs are created outside the turn, concurrently. Were the workers to collect side by side, a
stream would be shared among them (four workers at 20 events/s: four batches of five a second
instead of one of twenty), and each run costs the server its fixed price again."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from listener.backoff import ApiBackoff
from listener.batching import Backlog, BatchPolicy, by_route, collect
from listener.creation import RunCreation
from listener.messages import Accepted, Inbound, Rejection, check_message
from listener.observability import Metrics
from listener.rejecting import Rejecter
from listener.session import MqttSession
from listener.settings import ListenerSettings
from listener.stopping import StopSignal

log = logging.getLogger("listener")


@dataclass(eq=False)
class Processor:
    """What each worker does with the messages it takes from `queue`."""

    settings: ListenerSettings
    queue: asyncio.Queue[Inbound | None]
    session: MqttSession
    api: ApiBackoff
    rejecter: Rejecter
    batches: BatchPolicy
    runs: RunCreation
    metrics: Metrics
    stop: StopSignal
    backlog: Backlog | None = None  # None: batches never held past batch_max_wait
    last_taken: float = field(default=float("-inf"))  # monotonic time of the last message taken
    taking: asyncio.Lock = field(default_factory=asyncio.Lock)  # the turn to take and collect

    async def worker(self) -> None:
        """Take messages until the stop; none while the API is unavailable."""
        while not self.stop.requested:
            await self.api.ok.wait()
            async with self.taking:
                item = await self.queue.get()
                if item is None or self.stop.requested:
                    if item is not None:
                        self.session.abandon(item)
                    return
                groups = await self.take(item)
            await self.create(groups)

    async def accept(self, item: Inbound) -> Accepted | None:
        """The message's route and event; None when it went to the dead-letter store."""
        self.last_taken = time.monotonic()
        self.metrics.events_received.inc()
        try:
            checked = check_message(self.settings, item.topic, item.payload)
            if isinstance(checked, Rejection):
                await self.rejecter.dead_letter(item, checked)
                return None
            return Accepted(item, *checked)
        except Exception as exc:
            await self.rejecter.internal_error([item], exc)
            return None

    async def take(self, item: Inbound) -> list[list[Accepted]]:
        """`item` alone when the listener is idle (a run at once, no added latency), else the
        batch collected behind it, grouped by route; nothing when it was dead-lettered."""
        streaming = time.monotonic() - self.last_taken < self.settings.batch_max_wait
        accepted = await self.accept(item)
        if accepted is None:
            return []
        if not self.batches.allows(accepted.route) or (self.queue.empty() and not streaming):
            return [[accepted]]
        try:
            return by_route(await collect(
                accepted, self.queue, self.accept, max_size=self.batches.collect_size,
                max_wait=self.settings.batch_max_wait, stop=self.stop, backlog=self.backlog,
                max_hold=self.settings.batch_hold_max))
        except Exception:  # a bug while collecting: the first event goes on alone
            log.exception("unexpected error collecting a batch")
            return [[accepted]]

    async def create(self, groups: list[list[Accepted]]) -> None:
        for members in groups:
            await self.runs.create(members)
