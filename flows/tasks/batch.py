"""Batch-level tasks of the `publish-batch` flow: one task run per step for all the events of a run.

The single-event tasks (`build`, `validate`, `verify`, `publish`, `record`) cost a round of API
calls per event; these do the same work for a list of events in one task run each, keeping the
per-event idempotency exactly: each event's notifications are looked up in / stored under the
single-event build task's cache key, each notification's broker receipt under the publish task's
key (`cache_store.CacheStore`), so a batch and a single `publish-notification` run of one event
find what the other did. One event's failure never stops the others: each task returns, per
event, its value or the exception that event failed with (`Failure`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from chain.ledger import LedgerEntry, LedgerReader, open_ledger
from chain.mqtt import MqttConnection, MqttError, Publisher, PublishRefused
from chain.settings import ChainSettings
from wis2.cloudevent import CloudEvent
from wis2.dataset import DatasetDescription
from wis2.notification import Notification
from wis2.validation import ValidationFailed, validate_notification

from .build import checksum_of, current_build, not_cached, notifications_for, small_contents
from .cache_store import MISSING, CacheStore, acknowledged, publish_key
from .caching import build_cache_key
from .publish import BrokerReceipt, puback_extra, puback_time
from .validate import previous_pubtimes
from .verify import (
    DataMismatch,
    each_concurrently,
    load_credential,
    verification_client,
    verify_notifications,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """Why one event of the batch failed at a step (the other events go on)."""

    error: BaseException


@dataclass(frozen=True)
class Deferred:
    """An event left for the next round of the batch: an earlier event of this round announces a
    file it announces too (its relation must be decided after that one is recorded)."""


DEFERRED = Deferred()


@dataclass(frozen=True)
class Retry:
    """How a batch task retries one item (the single-event tasks' settings: `configured`)."""

    attempts: int = 1
    base_delay: float = 0.0
    jitter: float = 0.0

    @classmethod
    def of(cls, settings: ChainSettings) -> Retry:
        return cls(attempts=1 + settings.publish_retries, base_delay=settings.retry_base_delay,
                   jitter=settings.retry_jitter_factor)

    def delay(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1, 2, ...): exponential backoff with jitter."""
        base = self.base_delay * 2 ** (attempt - 1)
        return base * (1 + random.uniform(0, self.jitter))

    def call(self, fn: Callable[[], T], retry_if: Callable[[BaseException], bool],
             on_retry: Callable[[BaseException], None] = lambda exc: None) -> T:
        """`fn()`, retried while `retry_if(error)` and attempts remain."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.attempts or not retry_if(exc):
                    raise
                on_retry(exc)
                time.sleep(self.delay(attempt))


# ------------------------------------------------------------------------------------ build
@task(name="build-batch", cache_policy=NO_CACHE, retries=0)
def build_batch_task(
    events: Sequence[CloudEvent], dataset: DatasetDescription, ledger: LedgerReader,
    build: Task[Any, Any], publish: Task[Any, Any], topic: str,
) -> list[list[Notification] | Failure | Deferred]:
    """The notifications of each event, from the build task's cache (`build`'s key and store)
    or built now and stored there; a cached build the ledger now contradicts (another event
    recorded a new version of a file since) is built again, what was announced of it kept
    (`build.current_build`; announced: a receipt of `publish` on `topic`). An event announcing
    a file that an earlier event of this call announces is `DEFERRED` (not built, not cached).
    `ledger`: the entries of the events' data_ids (`chain.ledger.LedgerSnapshot`, read by the
    caller, which holds their claim)."""
    cache = CacheStore.of(build)
    announced = acknowledged(publish, topic)
    claimed: set[str] = set()
    out: list[list[Notification] | Failure | Deferred] = []
    cached = 0
    for event in events:
        key = build_cache_key(None, {"event": event, "dataset": dataset})
        try:
            notes = cache.lookup(key)
            fresh = notes is MISSING
            if fresh:
                notes = notifications_for(event, dataset, ledger, pubtime=datetime.now(UTC),
                                          contents=small_contents(event, dataset))
            elif (again := current_build(event, dataset, notes, ledger, announced)) is not None:
                notes, fresh = again, True
            data_ids = {note.properties.data_id for note in notes}
            if data_ids & claimed:
                out.append(DEFERRED)
                continue
            if fresh:
                cache.save(key, notes)
        except Exception as exc:
            out.append(Failure(exc))
            continue
        cached += not fresh
        claimed |= data_ids
        out.append(notes)
    built = sum(isinstance(o, list) for o in out)
    get_run_logger().info(
        "%d event(s): notifications of %d built now, %d from the cache, %d deferred, %d failed",
        len(events), built - cached, cached, sum(o is DEFERRED for o in out),
        sum(isinstance(o, Failure) for o in out))
    return out


# --------------------------------------------------------------------------------- validate
@dataclass(frozen=True)
class Validated:
    rows: list[dict[str, Any]]  # one per notification: result, checks, failed/warning details
    failure: ValidationFailed | None = None  # the first notification that is not valid


def validate_all(notifications: Sequence[Notification], topic: str,
                 previous: dict[str, str] | None = None) -> Validated:
    """Each notification validated; one summary row each (a batch's validation table: a row per
    check would be ~15 rows and ~1.5 kB per notification, for checks that all passed).
    `previous`: `validate.previous_pubtimes` (an update must be later than what it updates)."""
    rows: list[dict[str, Any]] = []
    failure: ValidationFailed | None = None
    for note in notifications:
        report = validate_notification(
            note.to_dict(), topic=topic, profile="publish",
            previous_pubtime=(previous or {}).get(note.properties.data_id))
        rows.append({"notification": note.id, **report.summary_row()})
        if not report.ok and failure is None:
            failure = ValidationFailed(report)
    return Validated(rows=rows, failure=failure)


@task(name="validate-batch", cache_policy=NO_CACHE, retries=0)
def validate_batch_task(
    batch: Sequence[Sequence[Notification]], topic: str,
    ledger: LedgerReader | None = None, publish: Task[Any, Any] | None = None,
) -> list[Validated]:
    """Validate every notification of every event strictly (never retried); an update not
    published yet must be later than what `ledger` says was published before it (`publish`:
    the publish task, whose cached receipts tell what was published)."""
    if ledger is not None and publish is not None:
        previous = previous_pubtimes([n for notes in batch for n in notes], ledger,
                                     acknowledged(publish, topic))
    else:
        previous = {}
    out = [validate_all(notes, topic, previous) for notes in batch]
    logger = get_run_logger()
    for result in out:
        if result.failure is not None:
            logger.error("notification %s is not valid", result.failure.report.subject)
    logger.info("%d event(s) valid for %s, %d not", sum(r.failure is None for r in out), topic,
                sum(r.failure is not None for r in out))
    return out


# ----------------------------------------------------------------------------------- verify
@task(name="verify-batch", cache_policy=NO_CACHE, retries=0)
def verify_batch_task(
    batch: Sequence[Sequence[Notification]], settings: ChainSettings,
    credential_block: str | None = None,
) -> list[Failure | None]:
    """Download and check each event's files, the events' downloads concurrently (at most
    `WIS2_VERIFY_CONCURRENCY` at a time, one client); a network error is retried per event
    (backoff), a `DataMismatch` fails that event at once. `credential_block`: the Prefect Secret
    block of the dataset's credential (access-controlled data)."""
    logger = get_run_logger()
    retry = Retry.of(settings)
    try:
        credential = load_credential(credential_block) if credential_block else None
    except Exception as exc:
        logger.error("credential %r not loaded: %s", credential_block, exc)
        return [Failure(exc)] * len(batch)
    with verification_client(settings.verify_timeout, settings.verify_concurrency) as client:

        def verify(notes: Sequence[Notification]) -> None:
            retry.call(lambda: verify_notifications(
                list(notes), settings.verify_timeout, settings.verify_max_bytes, None,
                settings.verify_max_seconds, credential, client=client),
                retry_if=lambda exc: not isinstance(exc, DataMismatch),
                on_retry=lambda exc: logger.warning("verification retried: %s", exc))

        results = each_concurrently(batch, verify, settings.verify_concurrency)
    out: list[Failure | None] = []
    for notes, result in zip(batch, results, strict=True):
        if isinstance(result, Exception):
            logger.error("data of %s not verified: %s",
                         ", ".join(n.properties.data_id for n in notes), result)
            out.append(Failure(result))
        else:
            out.append(None)
    logger.info("data of %d event(s) verified, %d failed", out.count(None),
                len(out) - out.count(None))
    return out


# ---------------------------------------------------------------------------------- publish
class _Broker:
    """One publisher connection for the batch, reconnected after a failure."""

    def __init__(self, connection: MqttConnection, timeout: float) -> None:
        self.connection, self.timeout = connection, timeout
        self._publisher: Publisher | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        try:
            if self._publisher is None:
                self._publisher = Publisher(self.connection, timeout=self.timeout).__enter__()
            self._publisher.publish(topic, payload, qos=1)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            try:
                publisher.close()
            except Exception as exc:  # already broken
                log.debug("closing the publisher: %s", exc)


@task(name="publish-batch", cache_policy=NO_CACHE, retries=0)
def publish_batch_task(
    batch: Sequence[Sequence[Notification]], topic: str, connection: MqttConnection,
    publish: Task[Any, Any], retry: Retry, timeout: float = 10.0,
) -> list[list[str | None] | Failure]:
    """Publish each notification (QoS 1, one connection, each PUBACK awaited) unless its
    publish-task cache key already holds a receipt; the receipt is written under that key right
    after the PUBACK. Per event, for each notification: the time of its PUBACK when it was sent
    now, None when it was published earlier. A message the broker refuses fails its event
    alone; once the connection failed past the retries, the remaining events fail with that
    error (nothing of theirs was sent)."""
    logger = get_run_logger()
    cache = CacheStore.of(publish)
    broker = _Broker(connection, timeout)
    broken: Failure | None = None
    out: list[list[str | None] | Failure] = []
    try:
        for notes in batch:
            if broken is not None:
                out.append(broken)
                continue
            sent: list[str | None] = []
            try:
                for note in notes:
                    key = publish_key(note, topic)
                    if cache.has(key):
                        sent.append(None)
                        continue
                    payload = note.to_json().encode("utf-8")
                    retry.call(lambda payload=payload: broker.publish(topic, payload),
                               retry_if=lambda exc: isinstance(exc, MqttError | OSError),
                               on_retry=lambda exc: logger.warning("publish retried: %s", exc))
                    got = receipt(note, topic, len(payload))
                    cache.save(key, got)
                    sent.append(got.published_at)
            except PublishRefused as exc:  # this message refused (e.g. too large): alone
                logger.error("publication refused: %s", exc)
                out.append(Failure(exc))
                continue
            except Exception as exc:
                logger.error("publication failed: %s", exc)
                broken = Failure(exc)
                out.append(broken)
                continue
            out.append(sent)
    finally:
        broker.close()
    done = [s for s in out if isinstance(s, list)]
    logger.info("published %d notification(s) on %s via %s, %d already published, %d event(s) "
                "failed", sum(t is not None for s in done for t in s), topic,
                connection.describe(), sum(s.count(None) for s in done), len(out) - len(done))
    return out


def receipt(note: Notification, topic: str, size: int) -> BrokerReceipt:
    """What the single-event publish task returns (and caches) for `note`."""
    return BrokerReceipt(
        notification_id=note.id, data_id=note.properties.data_id, topic=topic, rel=note.rel,
        published_at=puback_time(), bytes=size)


# ----------------------------------------------------------------------------------- record
def ledger_entry(note: Notification, puback_at: str | None = None) -> LedgerEntry:
    return LedgerEntry(notification_id=note.id, rel=note.rel or "canonical",
                       checksum=checksum_of(note), pubtime=note.properties.pubtime,
                       **not_cached(note), **puback_extra(puback_at))


@task(name="record-batch", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def record_batch_task(notifications: Sequence[Notification], ledger: str,
                      acked: Mapping[str, str] | None = None) -> int:
    """Record the notifications in the publication ledger (`ledger`: its location) in one
    transaction (`acked`: {notification id: its PUBACK time}, kept as `puback_at`)."""
    entries = {note.properties.data_id: ledger_entry(note, (acked or {}).get(note.id))
               for note in notifications}
    return open_ledger(ledger).record_many(entries)
