"""The `backfill` flow: (re)announce a whole archive through the publishing path, politely.

SOURCE (a directory of CloudEvents, a JSON-lines file, a STAC ItemCollection or static catalog:
`wis2.archive`) is read entry by entry; good events go, in groups of `batch_size`, through
`publish-batch` runs (sub-flow runs: the same tasks, caches, ledger and artifacts as live events),
one group at a time and no faster than `rate` notifications per second. A file already announced
with the same checksum is skipped as already published, a changed checksum is announced as
``update``, `operation="delete"` announces deletions. Stopping a backfill and starting it again
with the same SOURCE publishes only what is missing; a second run publishes nothing new.

The run shows a progress artifact while it runs and ends with a summary table (published, already
published, updates, deletions, failed, each failure with its position in SOURCE and its reason).
Bad entries never stop the others: the run ends Failed when any entry failed, after the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from chain.deployments import BACKFILL_FLOW
from chain.settings import ChainSettings
from flows.artifacts import artifact_key, batch_table_artifact
from flows.live_priority import LOOK_SECONDS, give_way
from flows.publish_batch import BatchRunResult, publish_batch
from wis2.archive import ArchiveEntry, count_archive, read_archive
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications
from wis2.relations import Operation
from wis2.validation import validate_notification

log = logging.getLogger(__name__)

Outcome = Literal["published", "already published", "update", "deletion", "failed",
                  "would publish"]

# In-process observers of a backfill's progress (the `wis2-chain backfill --local` progress bar).
PROGRESS_OBSERVERS: list[Callable[[BackfillCounts], None]] = []


class BackfillCounts(BaseModel):
    """What a backfill did so far (also its final result)."""

    total: int
    done: int = 0
    published: int = 0  # canonical notifications sent
    already_published: int = 0  # entries whose files were announced before (nothing sent)
    updates: int = 0
    deletions: int = 0
    failed: int = 0
    would_publish: int = 0  # dry run: notifications that would be sent
    failures: list[dict[str, str]] = []  # position, event id, reason

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else min(100.0, 100.0 * self.done / self.total)

    def summary(self) -> str:
        return (f"{self.done}/{self.total} entries: {self.published} published, "
                f"{self.already_published} already published, {self.updates} updates, "
                f"{self.deletions} deletions, {self.failed} failed"
                + (f", {self.would_publish} would be published" if self.would_publish else ""))


class Pace:
    """At most `rate` notifications per second on average since the start (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def restart_after(self, waited: float) -> None:
        """`waited` seconds were given to live events: not caught up afterwards (the rate stays
        an upper bound from then on)."""
        self.start += waited

    def wait_after(self, sent: int) -> float:
        """Count `sent` notifications; sleep until the average rate is back under the limit."""
        self.sent += sent
        if not self.rate:
            return 0.0
        delay = self.start + self.sent / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return max(delay, 0.0)


def _run_name() -> str:
    source = str(flow_run.parameters.get("source") or "source").rstrip("/")
    return f"backfill-{source.rsplit('/', 1)[-1]}"


def _chunks(entries: Iterator[ArchiveEntry], size: int) -> Iterator[list[ArchiveEntry]]:
    while chunk := list(islice(entries, size)):
        yield chunk


def _count_batch(counts: BackfillCounts, entries: list[ArchiveEntry],
                 result: BatchRunResult) -> int:
    """Add a batch's outcomes to `counts`; returns the notifications it sent."""
    sent = 0
    for entry, outcome in zip(entries, result.events, strict=True):
        if outcome.status == "failed":
            counts.failed += 1
            counts.failures.append({"position": entry.position,
                                    "event_id": str(outcome.event_id or ""),
                                    "reason": outcome.error or "failed"})
            continue
        fresh = [n for n in outcome.notifications if n.sent]
        if not fresh:
            counts.already_published += 1
        for note in fresh:
            sent += 1
            if note.rel == "update":
                counts.updates += 1
            elif note.rel == "deletion":
                counts.deletions += 1
            else:
                counts.published += 1
    return sent


def _dry_run(counts: BackfillCounts, entries: list[ArchiveEntry], dataset_name: str,
             settings: ChainSettings) -> None:
    """Build and validate without publishing."""
    dataset = load_dataset(dataset_name, settings.datasets_dir)
    for entry in entries:
        try:
            notes = build_notifications(parse_event(entry.event or {}), dataset)
            for note in notes:
                validate_notification(note.to_dict(), topic=dataset.topic).raise_for_failures()
        except Exception as exc:
            counts.failed += 1
            counts.failures.append({"position": entry.position,
                                    "event_id": str((entry.event or {}).get("id", "")),
                                    "reason": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        counts.would_publish += len(notes)


def _count_refused(counts: BackfillCounts, chunk: list[ArchiveEntry]) -> list[ArchiveEntry]:
    """Count the entries of `chunk` that could not be read as events; returns them."""
    bad = [entry for entry in chunk if not entry.ok]
    for entry in bad:
        counts.failed += 1
        counts.failures.append({"position": entry.position, "event_id": "",
                                "reason": "; ".join(str(err) for err in entry.errors)[:500]})
    return bad


def dry_run_archive(source: str, dataset: str | None = None,
                    operation: Operation | None = None,
                    observe: Callable[[BackfillCounts], None] | None = None) -> BackfillCounts:
    """A backfill's dry run outside Prefect (no API, no flow run): read SOURCE, build and
    validate every event, publish nothing (`wis2-chain backfill --dry-run`)."""
    settings = ChainSettings()
    dataset_name = dataset or settings.default_dataset
    counts = BackfillCounts(total=count_archive(source))
    for chunk in _chunks(read_archive(source, operation), settings.backfill_batch_size):
        _count_refused(counts, chunk)
        good = [e for e in chunk if e.ok]
        if good:
            _dry_run(counts, good, dataset_name, settings)
        counts.done += len(chunk)
        if observe is not None:
            observe(counts)
    return counts


@flow(
    name=BACKFILL_FLOW,
    flow_run_name=_run_name,
    description="Announce (or re-announce) a whole archive of files through publish-batch runs, "
    "with a rate limit, progress and a summary; resumable and idempotent.",
)
def backfill(
    source: str,
    dataset: str | None = None,
    operation: Operation | None = None,
    rate: float | None = None,
    batch_size: int | None = None,
    dry_run: bool = False,
) -> State:
    """Backfill SOURCE.

    Args:
        source: a directory of CloudEvent JSON files, a JSON-lines file of events, a STAC
            ItemCollection or static catalog (a path readable by the worker).
        dataset: dataset of the events (default: WIS2_DEFAULT_DATASET).
        operation: create, update or delete: overrides each event's operation.
        rate: most notifications per second (default: WIS2_BACKFILL_RATE).
        batch_size: events per publish-batch run (default: WIS2_BACKFILL_BATCH_SIZE).
        dry_run: build and validate every event, publish nothing.
    """
    settings = ChainSettings()
    logger = get_run_logger()
    dataset_name = dataset or settings.default_dataset
    rate = settings.backfill_rate if rate is None else rate
    size = batch_size or settings.backfill_batch_size
    label = _run_name()
    counts = BackfillCounts(total=count_archive(source))
    logger.info("backfill of %s: %d entries, dataset %s, %s, batches of %d%s", source,
                counts.total, dataset_name, f"at most {rate}/s" if rate else "no rate limit",
                size, " (dry run)" if dry_run else "")
    progress_id = create_progress_artifact(
        progress=0.0, key=artifact_key("progress", label),
        description=f"Backfill of {source}: {counts.total} entries")
    pace = Pace(rate)

    for chunk in _chunks(read_archive(source, operation), size):
        for bad in _count_refused(counts, chunk):
            logger.error("%s: refused: %s", bad.position, "; ".join(map(str, bad.errors)))
        good = [e for e in chunk if e.ok]
        if good and dry_run:
            _dry_run(counts, good, dataset_name, settings)
        elif good:
            if (waited := give_way(settings.backfill_yield_seconds)) >= LOOK_SECONDS:
                logger.info("backfill: %.1f s given to live events", waited)
            pace.restart_after(waited)
            state = publish_batch(events=[e.event for e in good], dataset=dataset_name,
                                  return_state=True)
            result = state.result(raise_on_failure=False)
            if isinstance(result, BatchRunResult):
                pace.wait_after(_count_batch(counts, good, result))
            else:  # the batch run itself crashed: every event of it failed
                for entry in good:
                    counts.failed += 1
                    counts.failures.append({"position": entry.position,
                                            "event_id": str((entry.event or {}).get("id", "")),
                                            "reason": f"publish-batch run: {state.message}"})
        counts.done += len(chunk)
        update_progress_artifact(progress_id, counts.percent, description=counts.summary())
        for observer in PROGRESS_OBSERVERS:
            observer(counts)
        logger.info("backfill: %s", counts.summary())

    _summary_artifact(counts, label, source)
    if counts.failed:
        return Failed(message=f"{counts.failed} of {counts.total} entries failed: "
                      f"{counts.summary()}"[:2000], data=counts)
    return Completed(message=counts.summary(), data=counts)


def _summary_artifact(counts: BackfillCounts, label: str, source: str) -> None:
    rows: list[dict[str, Any]] = [
        {"outcome": "published", "count": counts.published, "position": "", "reason": ""},
        {"outcome": "already published", "count": counts.already_published, "position": "",
         "reason": ""},
        {"outcome": "updates", "count": counts.updates, "position": "", "reason": ""},
        {"outcome": "deletions", "count": counts.deletions, "position": "", "reason": ""},
        {"outcome": "failed", "count": counts.failed, "position": "", "reason": ""},
    ]
    if counts.would_publish:
        rows.append({"outcome": "would publish (dry run)", "count": counts.would_publish,
                     "position": "", "reason": ""})
    rows += [{"outcome": "FAILED", "count": 1, "position": f["position"],
              "reason": f"event {f['event_id']}: {f['reason']}" if f["event_id"]
              else f["reason"]} for f in counts.failures]
    batch_table_artifact(rows, key=artifact_key("backfill", label),
                         description=f"Backfill of {source}: {counts.summary()}")
