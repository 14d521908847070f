"""The publication ledger alone: the relation it decides, and concurrent writes kept."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from chain.ledger import Ledger, relation_for


def test_ledger_records_and_decides_the_relation(tmp_path: Path) -> None:
    ledger = Ledger.in_dir(tmp_path)
    assert ledger.get("wis2/x/a") is None
    assert relation_for(None, "sha256:AAA", deletion=False) == "canonical"
    entry = ledger.record("wis2/x/a", notification_id="n1", rel="canonical", checksum="sha256:AAA")
    assert Ledger.in_dir(tmp_path).get("wis2/x/a") == entry
    assert relation_for(entry, "sha256:AAA", deletion=False) == "canonical"
    assert relation_for(entry, "sha256:BBB", deletion=False) == "update"
    assert relation_for(entry, "sha256:BBB", deletion=True) == "deletion"
    gone = ledger.record("wis2/x/a", notification_id="n2", rel="deletion")
    assert relation_for(gone, "sha256:CCC", deletion=False) == "canonical"


def test_ledger_keeps_every_concurrent_write(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.json")
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
    assert json.loads(ledger.path.read_text())  # valid JSON
