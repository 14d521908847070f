"""`previous_pubtimes`: which updates are compared with the ledger's last publication."""

from __future__ import annotations

from datetime import UTC, datetime

from chain.ledger_entry import LedgerEntry
from flows.tasks.validate import previous_pubtimes
from tests.fixtures.paths import BUFR_EVENT
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset
from wis2.mapping import build_notifications


class Ledger(dict):
    def get(self, key):  # type: ignore[override]
        return super().get(key)


def _note(operation: str):
    (note,) = build_notifications(parse_event(BUFR_EVENT.read_bytes()), load_dataset("argo"),
                                  operation=operation, pubtime=datetime(2026, 1, 2, tzinfo=UTC))
    return note


def test_only_updates_not_yet_published_are_compared() -> None:
    update, canonical = _note("update"), _note("create")
    data_id = update.properties.data_id
    ledger = Ledger({data_id: LedgerEntry(notification_id="other", rel="canonical",
                                          pubtime="2026-01-01T00:00:00Z")})
    assert previous_pubtimes([update], ledger) == {data_id: "2026-01-01T00:00:00Z"}
    assert previous_pubtimes([canonical], ledger) == {}
    assert previous_pubtimes([update], ledger, published=lambda note: True) == {}
    assert previous_pubtimes([update], Ledger()) == {}
    ledger[data_id] = LedgerEntry(notification_id=update.id, rel="update",
                                  pubtime=update.properties.pubtime)
    assert previous_pubtimes([update], ledger) == {}, "the same notification again"
