"""The publication ledger alone: the relation it decides, concurrent writes kept, the JSON ledger
of earlier versions imported."""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

from chain.ledger import Ledger, LedgerEntry
from wis2.relations import relation_for


def test_ledger_records_and_decides_the_relation(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    assert ledger.get("wis2/x/a") is None
    assert relation_for("create", None, "sha256:AAA") == "canonical"
    entry = ledger.record("wis2/x/a", notification_id="n1", rel="canonical", checksum="sha256:AAA")
    assert Ledger.in_dir(tmp_path).get("wis2/x/a") == entry
    assert relation_for("create", entry, "sha256:AAA") == "canonical"
    assert relation_for("create", entry, "sha256:BBB") == "update"
    assert relation_for("delete", entry, "sha256:BBB") == "deletion"
    gone = ledger.record("wis2/x/a", notification_id="n2", rel="deletion")
    assert relation_for("create", gone, "sha256:CCC") == "canonical"


def test_ledger_keeps_every_concurrent_write(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    keys = [f"wis2/x/{i}" for i in range(40)]
    threads = [
        threading.Thread(
            target=lambda k=key: Ledger(ledger.path).record(k, notification_id=k, rel="canonical")
        )
        for key in keys
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(ledger.all()) == sorted(keys)
    with closing(sqlite3.connect(ledger.path)) as db:  # a sound database
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_ledger_imports_the_json_ledger_of_earlier_versions(tmp_path: Path) -> None:
    entry = {"checksum": "sha256:AAA", "notification_id": "n1", "rel": "canonical",
             "pubtime": "2026-11-01T00:00:00Z", "recorded_at": "2026-11-01T00:00:01+00:00",
             "kind": "wcmp2-record"}
    (tmp_path / "publication-ledger.json").write_text(json.dumps({"wis2/x/a": entry}))
    ledger = Ledger.in_dir(tmp_path)
    assert ledger.get("wis2/x/a") == LedgerEntry.model_validate(entry)
    ledger.forget("wis2/x/a")
    assert Ledger.in_dir(tmp_path).get("wis2/x/a") is None  # imported once, not again


def test_ledger_records_many_in_one_transaction(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    ledger.record("wis2/x/a", notification_id="old", rel="canonical", checksum="sha256:AAA")
    entries = {"wis2/x/a": LedgerEntry(notification_id="n1", rel="update", checksum="sha256:B"),
               "wis2/x/b": LedgerEntry(notification_id="n2", rel="canonical", pubtime="t")}
    assert ledger.record_many(entries) == 2
    assert Ledger.in_dir(tmp_path).all() == entries
    assert ledger.record_many({}) == 0
