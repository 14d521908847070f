"""Rejecting messages: the dead letter is written (and counted) BEFORE the message is
acknowledged, so bad input is never lost; a bug while handling messages dead-letters them too."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from listener.deadletters import DeadLetter, DeadLetterStore
from listener.messages import Inbound, Rejection
from listener.observability import Metrics
from listener.session import MqttSession

log = logging.getLogger("listener")


@dataclass(eq=False)
class Rejecter:
    """Sends messages to the dead-letter store, then acknowledges them."""

    store: DeadLetterStore
    metrics: Metrics
    session: MqttSession

    async def dead_letter(self, item: Inbound, rejection: Rejection) -> None:
        """Store `item` in the dead-letter store with why, then acknowledge it."""
        letter = DeadLetter.new(item.topic, item.payload, rejection.reason, rejection.message,
                                rejection.errors, received=item.received_at)
        stored = await asyncio.to_thread(self.store.add, letter)
        self.metrics.rejected.labels(reason=rejection.reason).inc()
        log.warning("message rejected to the dead-letter store", extra={
            "reason": rejection.reason, "deadletter": stored.id, "topic": item.topic,
            "detail": rejection.message, "count": stored.count})
        self.session.ack(item)

    async def internal_error(self, items: list[Inbound], exc: Exception) -> None:
        """A bug must not lose the messages nor stop the listener: dead-letter them."""
        log.exception("unexpected error handling a message",
                      extra={"topic": items[0].topic if items else None, "messages": len(items)})
        for item in items:
            try:
                await self.dead_letter(item, Rejection(
                    "internal_error", f"{type(exc).__name__}: {exc}"))
            except Exception:
                log.exception("could not write the dead letter; message left unacknowledged")
                self.session.abandon(item)
