"""The pure parts of the batch tasks (flows/tasks/batch.py): retries, validation per event,
receipts, cache keys and ledger entries as the single-event tasks make them."""

from __future__ import annotations

import pytest

from chain.ledger import LedgerEntry
from chain.settings import ChainSettings
from flows.tasks.batch import Retry, ledger_entry, publish_key, receipt, validate_all
from flows.tasks.build import checksum_of
from flows.tasks.caching import publish_cache_key
from tests.fixtures.paths import BUFR_EVENT
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications
from wis2.notification import Notification

ARGO = load_dataset("argo")


def notification() -> Notification:
    [note] = build_notifications(parse_event(BUFR_EVENT.read_text()), ARGO)
    return note


def test_retry_backs_off_exponentially_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    retry = Retry(attempts=3, base_delay=1.0, jitter=0.5)
    assert [1.0 <= retry.delay(1) <= 1.5, 2.0 <= retry.delay(2) <= 3.0] == [True, True]
    slept: list[float] = []
    monkeypatch.setattr("flows.tasks.batch.time.sleep", slept.append)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("down")
        return "ok"

    assert retry.call(flaky, retry_if=lambda exc: True) == "ok"
    assert len(calls) == 3 and len(slept) == 2
    calls.clear()
    with pytest.raises(OSError):
        Retry(attempts=2).call(flaky, retry_if=lambda exc: True)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(OSError):  # not worth a retry: raised at once
        retry.call(flaky, retry_if=lambda exc: False)
    assert len(calls) == 1


def test_retry_follows_the_settings() -> None:
    settings = ChainSettings(publish_retries=4, retry_base_delay=0.5, retry_jitter_factor=0.1)
    assert Retry.of(settings) == Retry(attempts=5, base_delay=0.5, jitter=0.1)


def test_validation_per_event_names_the_first_bad_notification() -> None:
    good = notification()
    bad = Notification.model_validate({**good.to_dict(), "id": "not-a-uuid"})
    ok = validate_all([good], ARGO.topic)
    assert ok.failure is None and ok.rows and {r["notification"] for r in ok.rows} == {good.id}
    failed = validate_all([good, bad, bad], ARGO.topic)
    assert failed.failure is not None and failed.failure.report.subject == "not-a-uuid"
    assert {r["notification"] for r in failed.rows} == {good.id, "not-a-uuid"}
    # one row per notification (not per check): the result, the count, what failed and why
    assert len(ok.rows) == 1 and ok.rows[0]["result"] == "PASSED"
    assert ok.rows[0]["checks"].endswith(" passed")
    assert len(failed.rows) == 3
    bad_row = failed.rows[1]
    assert bad_row["result"] == "FAILED" and " of " in bad_row["checks"]
    assert "FAILED" in bad_row["details"] and "uuid" in bad_row["details"]


def test_receipts_keys_and_ledger_entries_are_the_single_event_tasks_ones() -> None:
    note = notification()
    key = publish_key(note, ARGO.topic)
    assert key == publish_cache_key(None, {"notification": note, "topic": ARGO.topic})
    done = receipt(note, ARGO.topic, 123)
    assert (done.notification_id, done.data_id, done.topic, done.rel, done.bytes) == (
        note.id, note.properties.data_id, ARGO.topic, note.rel, 123)
    entry = ledger_entry(note)
    assert entry.model_dump(exclude={"recorded_at"}) == LedgerEntry(
        notification_id=note.id, rel="canonical", checksum=checksum_of(note),
        pubtime=note.properties.pubtime).model_dump(exclude={"recorded_at"})
