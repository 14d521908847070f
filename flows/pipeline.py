"""The per-event pipeline of the publishing flows, and what they share (`Pipeline`).

One event: claim its data_ids -> build its notifications (cached per event identity; a cached
build that the ledger now contradicts is built again, what was announced of it kept) ->
validate them strictly -> verify the data (optional) -> publish each (cached per notification id,
retried) -> record the fresh ones in the publication ledger -> release the claim. A flow run sets
up a `Pipeline` once (dataset, configured tasks, ledger, broker connection) and calls
`publish_event` for its event (`publish-notification`); `publish-batch` takes all its events
through the same steps at once (`flows.batch_pipeline`), its round's data_ids claimed likewise.

The claim (`Pipeline.claimed`, the ledger's `claim`) makes one run at a time, on the whole node,
decide and record the publication of a file: two events for one file processed at the same time
on two worker hosts give ``canonical`` then ``update``, never two canonicals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect.logging import get_run_logger
from pydantic import BaseModel

from chain.diskspace import out_of_space, retry_when_disk_full
from chain.ledger import (
    Claim,
    ClaimLost,
    Ledger,
    LedgerEntry,
    LedgerReader,
    LedgerSnapshot,
    ledger_location,
    open_ledger,
)
from chain.metrics import FLOW_METRICS
from chain.mqtt import MqttConnection
from chain.settings import ChainSettings
from flows.tasks import (
    BrokerReceipt,
    ConfiguredTasks,
    DataMismatch,
    configured_tasks,
    load_broker_connection,
    load_dataset_task,
    record_publication_task,
    validate_notifications_task,
)
from flows.tasks.build import checksum_of, current_build
from flows.tasks.cache_store import CacheStore, acknowledged
from flows.tasks.caching import build_cache_key
from flows.tasks.validate import previous_pubtimes
from wis2.cloudevent import CloudEvent, parse_event
from wis2.dataset import DatasetDescription
from wis2.errors import FieldError, InvalidInput
from wis2.mapping import data_ids_of
from wis2.notification import Notification
from wis2.relations import DATA_RELATIONS, relation_for
from wis2.validation import ValidationFailed

log = logging.getLogger(__name__)

T = TypeVar("T")


class NotificationOutcome(BaseModel):
    """One notification of a run: what it announced, and whether this run sent it (`sent`) or an
    earlier run had (a cache hit: not sent again)."""

    id: str
    data_id: str
    rel: str | None
    pubtime: str
    href: str | None
    sent: bool  # False: published by an earlier run (cached), not sent again


def as_event(event: CloudEvent | dict[str, Any] | str | bytes) -> CloudEvent:
    """The event as a model; `InvalidInput` naming the bad fields otherwise."""
    if isinstance(event, CloudEvent):
        return event
    return parse_event(event)


def event_json(event: Any) -> Any:
    """The event as the operator should see it (JSON data, as received when possible)."""
    if isinstance(event, CloudEvent):
        return event.to_dict()
    if isinstance(event, bytes | str):
        try:
            return json.loads(event)
        except ValueError:
            return event if isinstance(event, str) else event.decode("utf-8", "replace")
    return event


def file_label(event: Any) -> str:
    """A name for the run: the handled file (``IOPX01_LFVX_251403.BU``), else the event id."""
    try:
        return as_event(event).file_label()
    except Exception:
        raw = event_json(event)
        if isinstance(raw, dict) and raw.get("id"):
            return f"invalid-event-{raw['id']}"
        return "invalid-event"


def field_errors_of(exc: BaseException) -> list[FieldError]:
    """The bad fields an error names (JSON paths), for failure reports."""
    if isinstance(exc, InvalidInput):
        return list(exc.errors)
    if isinstance(exc, ValidationFailed):
        return [FieldError(path=f"{exc.report.subject} check {c.id}", message=c.message)
                for c in exc.report.failures]
    if isinstance(exc, DataMismatch):
        return [FieldError(path=exc.path, message=str(exc))]
    return []


@dataclass
class Pipeline:
    """What the events of one flow run share: settings, dataset, tasks, ledger, broker."""

    settings: ChainSettings
    dataset: DatasetDescription
    tasks: ConfiguredTasks
    ledger_location: str  # `chain.ledger.ledger_location`: a path or URL, no secret
    _connection: MqttConnection | None = field(default=None, repr=False)

    @classmethod
    def load(cls, dataset_name: str, settings: ChainSettings) -> Pipeline:
        dataset = load_dataset_task(dataset_name, settings.datasets_dir,
                                    settings.block_cache_seconds)
        FLOW_METRICS.use_dataset(dataset.topic, dataset.name)
        return cls(
            settings=settings,
            dataset=dataset,
            tasks=configured_tasks(settings),
            ledger_location=ledger_location(settings),
        )

    @property
    def ledger(self) -> Ledger:
        return open_ledger(self.ledger_location)

    @contextmanager
    def claimed(self, data_ids: Iterable[str]) -> Iterator[Claim]:
        """Hold `data_ids` for the whole node while the block runs (build .. ledger record).
        Waits for another run holding one of them, at most WIS2_CACHE_LOCK_TIMEOUT seconds
        (`ClaimTimeout` naming the data_id). Confirm the claim before publishing (`recheck`)."""
        with self.ledger.claim(data_ids, self.settings.cache_lock_timeout) as claim:
            yield claim

    def recheck(self, claim: Claim, notifications: list[Notification]
                ) -> tuple[LedgerSnapshot, list[str | None]] | None:
        """Right before publishing: `recheck_claim` with the data notifications' rules (a
        file announced before: `announced_before`; a relation that still holds: the one
        `relation_for` gives against the entry read again)."""
        return recheck_claim(claim, self.ledger, notifications, self.announced_before,
                             data_relation_holds)

    def announced_before(self, note: Notification,
                         ledger: LedgerReader | None = None) -> str | None:
        """The id under which this node already announced this file: this very notification
        (its id is the ledger's: acknowledged by the broker earlier, e.g. by a run on another
        host whose cached results are not shared), or another event's with the same checksum (a
        file announced twice, an archive backfilled after live publication); else None. A
        deletion, or a file without checksum, is skipped only as this very notification."""
        entry = (ledger or self.ledger).get(note.properties.data_id)
        if entry is None:
            return None
        if entry.notification_id == note.id:
            return note.id
        checksum = checksum_of(note)
        if (note.rel == "deletion" or checksum is None or entry.rel == "deletion"
                or entry.checksum != checksum):
            return None
        return entry.notification_id

    def when_disk_has_space(self, call: Callable[[], T]) -> T:
        """`call()` once the results' disk has WIS2_DISK_RESERVE_MB free, again after a
        failure for lack of space (`chain.diskspace.retry_when_disk_full`: safe, the cache and
        the ledger make a repeat publish nothing twice), for WIS2_DISK_FULL_WAIT_SECONDS at most."""
        s = self.settings
        return retry_when_disk_full(call, Path(s.results_dir).expanduser(),
                                    int(s.disk_reserve_mb * 2**20), s.disk_full_wait_seconds)

    def out_of_space(self, error: BaseException) -> bool:
        """Whether `error` is the results' disk being full (`chain.diskspace`)."""
        return out_of_space(error, Path(self.settings.results_dir).expanduser(),
                            int(self.settings.disk_reserve_mb * 2**20))

    def connection(self) -> MqttConnection:
        """The broker to publish with, loaded on first use (after validation passed)."""
        if self._connection is None:
            connection, origin = load_broker_connection(self.settings)
            get_run_logger().info("publishing on %s via %s (%s)", self.dataset.topic,
                                  connection.describe(), origin)
            self._connection = connection
        return self._connection


@dataclass
class ProcessedEvent:
    """One event through the pipeline: its notifications, which were sent, the validation rows."""

    event: CloudEvent
    notifications: list[Notification]
    sent: list[bool]  # per notification: False when published earlier (cache hit)
    validation_rows: list[dict[str, Any]]
    # per notification: the id under which another event already announced the same file with
    # the same checksum (not announced again), else None
    earlier_ids: list[str | None] = field(default_factory=list)

    def published(self) -> list[NotificationOutcome]:
        earlier = self.earlier_ids or [None] * len(self.notifications)
        return [
            NotificationOutcome(
                id=earlier_id or note.id,
                data_id=note.properties.data_id,
                rel=note.rel,
                pubtime=note.properties.pubtime,
                href=next((lk.href for lk in note.links if lk.rel == note.rel), None),
                sent=was_sent,
            )
            for note, was_sent, earlier_id in zip(self.notifications, self.sent, earlier,
                                                  strict=True)
        ]


def data_relation_holds(note: Notification, entry: LedgerEntry | None) -> bool:
    """Whether a data notification's link relation still holds against the ledger's entry of
    its file (a deletion's always does)."""
    return note.rel not in DATA_RELATIONS or relation_for(
        "create", entry, checksum_of(note)) == note.rel


def recheck_claim(
    claim: Claim, ledger: Ledger, notifications: list[Notification],
    announced_before: Callable[[Notification, LedgerReader], str | None],
    holds: Callable[[Notification, LedgerEntry | None], bool],
) -> tuple[LedgerSnapshot, list[str | None]] | None:
    """Right before publishing what was decided under `claim` (every publishing flow: data
    and discovery metadata). None when the claim was held all along: what was read under it
    still holds. Otherwise its locks died with their connection (the ledger's server
    restarted) and `claim.confirm()` has taken them again: the entries of the notifications'
    data_ids are read again, and for each notification the id under which the node announced
    its file meanwhile (`announced_before`: not sent then). A notification not announced whose
    decision the entry read again contradicts (`holds` False: another run recorded its file
    meanwhile) raises `ClaimLost`: the run is scheduled again (`chain.failures`) and decides
    anew."""
    if claim.confirm():
        return None
    now = LedgerSnapshot(ledger, {n.properties.data_id for n in notifications})
    earlier = [announced_before(note, now) for note in notifications]
    for note, earlier_id in zip(notifications, earlier, strict=True):
        if earlier_id is None and not holds(note, now.get(note.properties.data_id)):
            raise ClaimLost(
                f"{note.properties.data_id}: recorded by another run while this run's claim "
                f"was lost with its ledger connection; {note.rel} no longer holds")
    get_run_logger().warning("claim of %d data_id(s) taken again after its connection was "
                             "lost; ledger read again: %d already announced",
                             len(notifications), sum(e is not None for e in earlier))
    return now, earlier


def _in_ledger(ledger: LedgerReader, note: Notification) -> bool:
    """Whether the ledger holds this publication, or a later one, of the note's data_id. A run
    killed after the broker's PUBACK and before the record leaves it out: its rerun finds the
    publication cached and records it all the same."""
    entry = ledger.get(note.properties.data_id)
    return entry is not None and (entry.notification_id == note.id
                                  or (entry.pubtime or "") >= note.properties.pubtime)


def publish_event(
    raw_event: Any, pipeline: Pipeline, *, validation_key: str | None
) -> ProcessedEvent:
    """Build, validate, verify, publish and record the notification(s) of one event, its
    data_ids claimed for the whole node meanwhile (`Pipeline.claimed`).

    `validation_key`: key of the validation table artifact when a notification is invalid; the
    rows of valid ones are returned (`validation_rows`) for the caller to report. Raises on the
    first failing step (nothing published then, except when a later notification of a
    multi-asset event fails to publish).
    """
    event = as_event(raw_event)

    def attempt() -> ProcessedEvent:
        with pipeline.claimed(data_ids_of(event, pipeline.dataset)) as claim:
            return _publish_claimed(event, pipeline, validation_key, claim)

    return pipeline.when_disk_has_space(attempt)


def _publish_claimed(
    event: CloudEvent, pipeline: Pipeline, validation_key: str | None, claim: Claim
) -> ProcessedEvent:
    logger = get_run_logger()
    tasks, settings = pipeline.tasks, pipeline.settings
    notifications = tasks.build(event, pipeline.dataset, pipeline.ledger_location)
    if not notifications:
        raise InvalidInput(
            [FieldError(path="$.data.assets", message="no data asset to announce")], what="event"
        )
    topic = pipeline.dataset.topic
    announced = acknowledged(tasks.publish, topic)  # by the broker: its receipt is cached

    # the ledger's entries of the event's files, claimed: nobody else records them meanwhile
    known = LedgerSnapshot(pipeline.ledger, {n.properties.data_id for n in notifications})
    # a build cached by an earlier run of this event, before another event recorded a new
    # version of one of its files, is built again (what was announced of it kept)
    if (again := current_build(event, pipeline.dataset, notifications, known,
                               announced)) is not None:
        CacheStore.of(tasks.build).save(
            build_cache_key(None, {"event": event, "dataset": pipeline.dataset}), again)
        notifications = again
    previous = previous_pubtimes(notifications, known, announced)
    rows = validate_notifications_task(notifications, topic, validation_key, previous)
    earlier = [pipeline.announced_before(note, known) for note in notifications]
    for note, earlier_id in zip(notifications, earlier, strict=True):
        if earlier_id == note.id:
            logger.info("notification %s (%s) was already acknowledged by the broker: not sent "
                        "again", note.id, note.properties.data_id)
        elif earlier_id:
            logger.info("%s: this file with this checksum was already announced as %s: "
                        "not announced again", note.properties.data_id, earlier_id)
    to_send = [note for note, earlier_id in zip(notifications, earlier, strict=True)
               if not earlier_id]

    if settings.verify_data and to_send:
        tasks.verify(to_send, settings.verify_timeout, settings.verify_max_bytes,
                     settings.verify_max_seconds,
                     credential_block=pipeline.dataset.credential_block,
                     concurrency=settings.verify_concurrency)
    elif not settings.verify_data:
        logger.info("data verification is off (WIS2_VERIFY_DATA=false)")
    if to_send and (again := pipeline.recheck(claim, notifications)) is not None:
        earlier = again[1]

    sent: list[bool] = []
    acked: dict[str, str] = {}
    for note, earlier_id in zip(notifications, earlier, strict=True):
        if earlier_id:
            sent.append(False)
            continue
        state = tasks.publish(note, pipeline.dataset.topic, pipeline.connection(),
                              return_state=True)
        receipt: BrokerReceipt = state.result()  # raises the publish error after retries
        acked[receipt.notification_id] = receipt.published_at
        sent.append(state.name != "Cached")
        logger.info("notification %s: %s", receipt.notification_id,
                    "sent" if sent[-1] else "already published (cached)")

    fresh = [note for note, was_sent, earlier_id in zip(notifications, sent, earlier, strict=True)
             if was_sent or (not earlier_id and not _in_ledger(pipeline.ledger, note))]
    if fresh:
        record_publication_task(fresh, pipeline.ledger_location, acked=acked)
    FLOW_METRICS.outcome(sent, event.time)
    return ProcessedEvent(event=event, notifications=notifications, sent=sent,
                          validation_rows=rows, earlier_ids=earlier)
