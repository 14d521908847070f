"""The pipeline of a `publish-batch` run: all its events through each step at once.

Same steps and guarantees as the per-event pipeline (`flows.pipeline.publish_event`), in a
constant number of task runs per batch run instead of about five per event (`flows.tasks.batch`):
``build-batch`` -> ``validate-batch`` -> ``verify-batch`` (when verification is on) ->
``publish-batch`` -> ``record-batch``. Each event's notifications and each notification's receipt
stay cached under the single-event tasks' keys, so an event published in a batch and run again
alone (or the reverse) gets the same notification id and is not sent again.

The relation of a notification (canonical / update) depends on what the ledger holds for its
``data_id``; events announcing the same file one after the other in one batch are therefore never
in the same round: the later one is deferred to a next round, built once the earlier one is
recorded, as the per-event pipeline would (one round for a batch of distinct files). Each round
holds the ledger's claim of its events' data_ids (`Pipeline.claimed`) from the build to the
record, as `publish_event` does per event: a batch and any other run of the same files, on any
worker host, decide and record their relations one after the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prefect.logging import get_run_logger
from prefect.utilities.annotations import quote

from chain.ledger import Claim, LedgerSnapshot
from chain.metrics import FLOW_METRICS
from flows.pipeline import Pipeline, ProcessedEvent, _in_ledger, as_event, file_label
from flows.tasks.batch import (
    DEFERRED,
    Failure,
    Retry,
    build_batch_task,
    publish_batch_task,
    record_batch_task,
    validate_batch_task,
    verify_batch_task,
)
from wis2.cloudevent import CloudEvent
from wis2.errors import FieldError, InvalidInput
from wis2.mapping import data_ids_of
from wis2.notification import Notification

log = logging.getLogger(__name__)


@dataclass
class BatchEvent:
    """One event of the batch: as received, then what it published or why it failed."""

    raw: Any
    label: str
    event: CloudEvent | None = None
    done: ProcessedEvent | None = None
    error: BaseException | None = None


@dataclass
class _Active:
    """An event going through the steps of a round."""

    item: BatchEvent
    notifications: list[Notification]
    rows: list[dict[str, Any]] = field(default_factory=list)
    earlier: list[str | None] = field(default_factory=list)

    @property
    def to_send(self) -> list[Notification]:
        return [n for n, e in zip(self.notifications, self.earlier, strict=True) if not e]

    def fail(self, error: BaseException) -> None:
        self.item.error = error


def publish_events(raw_events: list[Any], pipeline: Pipeline) -> list[BatchEvent]:
    """Publish the notifications of each event; returns each event's outcome, in order."""
    items = [BatchEvent(raw=raw, label=file_label(raw)) for raw in raw_events]
    pending: list[BatchEvent] = []
    for item in items:
        try:
            item.event = as_event(item.raw)
        except Exception as exc:  # bad event: fails alone, named fields
            item.error = exc
        else:
            pending.append(item)
    rounds = 0
    while pending:
        rounds += 1
        pending = pipeline.when_disk_has_space(partial(_round, pending, pipeline))
        pending += _out_of_space(items, pending, pipeline)
    if rounds > 1:
        get_run_logger().info("%d rounds: some events of the batch announce the same file",
                              rounds)
    for item in items:
        if item.error is not None:
            FLOW_METRICS.failure(item.error)
        elif item.done is not None:
            FLOW_METRICS.outcome(item.done.sent, item.done.event.time)
    return items


def _out_of_space(items: list[BatchEvent], pending: list[BatchEvent],
                  pipeline: Pipeline) -> list[BatchEvent]:
    """The events of the round that failed for lack of disk space, made pending again (the
    next round waits for space first: `Pipeline.when_disk_has_space`)."""
    full = [item for item in items
            if item.error is not None and all(item is not other for other in pending)
            and pipeline.out_of_space(item.error)]
    for item in full:
        get_run_logger().warning("%s: no space left on the results' disk (%s): retried once "
                                 "space is freed", item.label, item.error)
        item.error = None
    return full


def _round(items: list[BatchEvent], pipeline: Pipeline) -> list[BatchEvent]:
    """Claim the data_ids of the events `items`, then build -> validate -> verify -> publish ->
    record them; returns those deferred to the next round (they announce a file an earlier event
    of this round announces). An event whose data_ids cannot be computed fails alone; when the
    claim or the read of the round's ledger entries fails (a data_id held past
    WIS2_CACHE_LOCK_TIMEOUT, the ledger unreachable),
    the round's events fail with that error (for replay), nothing of theirs built or sent."""
    claiming: list[BatchEvent] = []
    data_ids: set[str] = set()
    for item in items:
        try:
            data_ids.update(data_ids_of(item.event, pipeline.dataset))  # type: ignore[arg-type]
        except Exception as exc:  # as publish_event: this event alone
            item.error = exc
        else:
            claiming.append(item)
    if not claiming:
        return []
    # the data_id claim spans build..record here (in the flow's thread: claims are per thread),
    # so that a round decides and records the relation of its files once for the whole node,
    # also against runs on other worker hosts; publish-notification runs claim the same way
    with ExitStack() as claim:
        try:
            held = claim.enter_context(pipeline.claimed(sorted(data_ids)))
            # the round's ledger entries in one read: claimed, nobody else records them until
            # this round has recorded its own
            known = LedgerSnapshot(pipeline.ledger, data_ids)
        except Exception as exc:
            get_run_logger().error("%d event(s) not published: %s", len(claiming), exc)
            for item in claiming:
                item.error = exc
            return []
        return _claimed_round(claiming, pipeline, known, held)


def _claimed_round(items: list[BatchEvent], pipeline: Pipeline,
                   known: LedgerSnapshot, claim: Claim) -> list[BatchEvent]:
    tasks, settings, topic = pipeline.tasks, pipeline.settings, pipeline.dataset.topic
    logger = get_run_logger()
    built = _each(len(items), lambda: build_batch_task(
        quote([i.event for i in items]), pipeline.dataset, quote(known), quote(tasks.build),
        quote(tasks.publish), pipeline.dataset.topic))
    deferred: list[BatchEvent] = []
    active: list[_Active] = []
    for item, result in zip(items, built, strict=True):
        if result is DEFERRED:
            deferred.append(item)
        elif isinstance(result, Failure):
            item.error = result.error
        elif not result:
            item.error = InvalidInput([FieldError(path="$.data.assets",
                                                  message="no data asset to announce")],
                                      what="event")
        else:
            active.append(_Active(item=item, notifications=list(result)))

    active = _validated(active, topic, known, tasks.publish)
    for one in active:
        one.earlier = [pipeline.announced_before(note, known) for note in one.notifications]
    repeated = [n.properties.data_id for one in active
                for n, e in zip(one.notifications, one.earlier, strict=True) if e]
    if repeated:
        logger.info("%d file(s) already announced with the same checksum by other events, not "
                    "announced again: %s", len(repeated), ", ".join(repeated[:5])
                    + (", ..." if len(repeated) > 5 else ""))

    if settings.verify_data:
        active = _verified(active, settings, pipeline.dataset.credential_block)
    else:
        logger.info("data verification is off (WIS2_VERIFY_DATA=false)")

    if any(one.to_send for one in active):
        try:  # the claim held all along, or taken again and the ledger read again
            again = pipeline.recheck(claim, [n for one in active for n in one.notifications])
        except Exception as exc:
            logger.error("%d event(s) not published: %s", len(active), exc)
            for one in active:
                one.fail(exc)
            return deferred
        if again is not None:
            known, earlier = again[0], iter(again[1])
            for one in active:
                one.earlier = [next(earlier) for _ in one.notifications]
    sending = [one for one in active if one.to_send]
    results: list[list[str | None] | Failure] = []
    if sending:
        try:
            connection = pipeline.connection()
        except Exception as exc:  # no broker block/settings: nothing can be sent
            results = [Failure(exc)] * len(sending)
        else:
            results = _each(len(sending), lambda: publish_batch_task(
                quote([one.to_send for one in sending]), topic, connection,
                quote(tasks.publish), Retry.of(settings)))
    outcome = dict(zip((id(one) for one in sending), results, strict=True))

    fresh: list[Notification] = []
    recording: list[_Active] = []
    acked: dict[str, str] = {}  # notification id: its PUBACK time
    for one in active:
        result = outcome.get(id(one), [])
        if isinstance(result, Failure):
            one.fail(result.error)
            continue
        sent_now = iter(result)
        acked_at = [None if e else next(sent_now) for e in one.earlier]
        acked |= {n.id: t for n, t in zip(one.notifications, acked_at, strict=True) if t}
        sent = [t is not None for t in acked_at]
        new = [n for n, s, e in zip(one.notifications, sent, one.earlier, strict=True)
               if s or (not e and not _in_ledger(known, n))]
        fresh += new
        recording += [one] if new else []
        one.item.done = ProcessedEvent(event=one.item.event, notifications=one.notifications,
                                       sent=sent, validation_rows=one.rows,
                                       earlier_ids=one.earlier)  # type: ignore[arg-type]
    if fresh:
        try:
            record_batch_task(quote(fresh), pipeline.ledger_location, acked)
        except Exception as exc:  # published, not recorded: a rerun records them
            for one in recording:
                one.item.done = None
                one.fail(exc)
    return deferred


def _each(count: int, call: Callable[[], list[Any]]) -> list[Any]:
    """A batch task's per-event results; when the task itself failed, that failure for each."""
    try:
        return call()
    except Exception as exc:
        get_run_logger().error("%s", exc)
        return [Failure(exc)] * count


def _validated(active: list[_Active], topic: str, known: LedgerSnapshot,
               publish: Any) -> list[_Active]:
    if not active:
        return active
    checked = _each(len(active), lambda: validate_batch_task(
        quote([one.notifications for one in active]), topic, quote(known), quote(publish)))
    kept = []
    for one, result in zip(active, checked, strict=True):
        if isinstance(result, Failure):
            one.fail(result.error)
        elif result.failure is not None:
            one.fail(result.failure)
        else:
            one.rows = result.rows
            kept.append(one)
    return kept


def _verified(active: list[_Active], settings: Any,
              credential_block: str | None) -> list[_Active]:
    checking = [one for one in active if one.to_send]
    if not checking:
        return active
    failures = _each(len(checking), lambda: verify_batch_task(
        quote([one.to_send for one in checking]), settings, credential_block))
    failed = set()
    for one, failure in zip(checking, failures, strict=True):
        if failure is not None:
            one.fail(failure.error)
            failed.add(id(one))
    return [one for one in active if id(one) not in failed]
