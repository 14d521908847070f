"""The workers on the asyncio loop: each takes a message from the queue, checks it (a bad one goes
to the dead-letter store), then creates its run at once when nothing is queued behind it, or
collects the burst queued behind it into batch runs. A `None` in the queue stops one worker."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from listener.backoff import ApiBackoff
from listener.batching import BatchPolicy, by_route, collect
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

    async def worker(self) -> None:
        """Take messages until the stop; none while the API is unavailable."""
        while not self.stop.requested:
            await self.api.ok.wait()
            item = await self.queue.get()
            if item is None or self.stop.requested:
                if item is not None:
                    self.session.abandon(item)
                return
            await self.handle(item)

    async def accept(self, item: Inbound) -> Accepted | None:
        """The message's route and event; None when it went to the dead-letter store."""
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

    async def handle(self, item: Inbound) -> None:
        accepted = await self.accept(item)
        if accepted is None:
            return
        if not self.batches.allows(accepted.route) or self.queue.empty():
            await self.runs.create([accepted])  # idle: a run at once, no added latency
            return
        groups = [[accepted]]
        try:
            groups = by_route(await collect(
                accepted, self.queue, self.accept, max_size=self.batches.collect_size,
                max_wait=self.settings.batch_max_wait, stop=self.stop))
        except Exception:  # a bug while collecting: the first event goes on alone
            log.exception("unexpected error collecting a batch")
        for members in groups:
            await self.runs.create(members)
