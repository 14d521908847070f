"""The publication ledger alone: the relation it decides, concurrent writes kept, the JSON ledger
of earlier versions imported."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
from pydantic import ValidationError

from chain.ledger import (
    ClaimTimeout,
    LedgerEntry,
    LedgerSnapshot,
    SqliteLedger,
    claim_key,
    ledger_location,
    open_ledger,
    ordered_claims,
)
from chain.settings import ChainSettings
from wis2.relations import relation_for


def test_ledger_records_and_decides_the_relation(tmp_path: Path) -> None:
    ledger = SqliteLedger.in_dir(tmp_path)
    assert ledger.get("wis2/x/a") is None
    assert relation_for("create", None, "sha256:AAA") == "canonical"
    entry = ledger.record("wis2/x/a", notification_id="n1", rel="canonical", checksum="sha256:AAA")
    assert SqliteLedger.in_dir(tmp_path).get("wis2/x/a") == entry
    assert relation_for("create", entry, "sha256:AAA") == "canonical"
    assert relation_for("create", entry, "sha256:BBB") == "update"
    assert relation_for("delete", entry, "sha256:BBB") == "deletion"
    gone = ledger.record("wis2/x/a", notification_id="n2", rel="deletion")
    assert relation_for("create", gone, "sha256:CCC") == "canonical"


def test_get_many_reads_entries_in_chunks_and_a_snapshot_answers_from_them(
        tmp_path: Path) -> None:
    ledger = SqliteLedger.in_dir(tmp_path)
    keys = [f"wis2/x/{i:04d}" for i in range(1200)]  # more than one `IN (...)` chunk
    ledger.record_many({k: LedgerEntry(notification_id=k, rel="canonical") for k in keys[::2]})
    found = ledger.get_many(keys)
    assert sorted(found) == keys[::2] and found[keys[0]].notification_id == keys[0]

    snapshot = LedgerSnapshot(ledger, keys[:4])
    ledger.record(keys[1], notification_id="later", rel="canonical")
    assert snapshot.get(keys[0]) == found[keys[0]]
    assert snapshot.get(keys[1]) is None  # as read: the keys are claimed by the reader
    assert snapshot.get(keys[10]) == found[keys[10]]  # not in the snapshot: read now
    assert snapshot.get("wis2/x/none") is None


def test_ledger_keeps_every_concurrent_write(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    keys = [f"wis2/x/{i}" for i in range(40)]
    threads = [
        threading.Thread(
            target=lambda k=key: SqliteLedger(ledger.path).record(k, notification_id=k,
                                                                  rel="canonical")
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
    ledger = SqliteLedger.in_dir(tmp_path)
    assert ledger.get("wis2/x/a") == LedgerEntry.model_validate(entry)
    ledger.forget("wis2/x/a")
    assert SqliteLedger.in_dir(tmp_path).get("wis2/x/a") is None  # imported once, not again


def _first_use(path: str, key: str) -> None:
    SqliteLedger(path).record(key, notification_id=key, rel="canonical")


def test_concurrent_first_uses_by_processes_all_succeed(tmp_path: Path) -> None:
    """Processes opening a new ledger at the same time (each its own first use) all record."""
    path = str(tmp_path / "ledger.sqlite3")
    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        pool.starmap(_first_use, [(path, f"wis2/x/{i}") for i in range(24)])
    assert len(SqliteLedger(path).all()) == 24


def test_a_claim_waits_for_the_holder_and_times_out_naming_the_data_id(tmp_path: Path) -> None:
    ledger = SqliteLedger.in_dir(tmp_path)
    order: list[str] = []

    def second() -> None:
        with SqliteLedger.in_dir(tmp_path).claim(["wis2/x/b", "wis2/x/a"], timeout=30):
            order.append("second")

    def timed_out() -> None:
        with pytest.raises(ClaimTimeout, match=r"'wis2/x/a'.*0.2 s.*WIS2_CACHE_LOCK_TIMEOUT"):
            with SqliteLedger.in_dir(tmp_path).claim(["wis2/x/a"], timeout=0.2):
                pass
        with ledger.claim(["wis2/x/other"], timeout=0.2):  # another data_id: not held
            order.append("other")

    with ledger.claim(["wis2/x/a"], timeout=1):
        checker = threading.Thread(target=timed_out)
        checker.start()
        checker.join()
        assert order == ["other"]
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # waits for the holder
        order.append("first")
    waiter.join(10)
    assert order == ["other", "first", "second"]


def test_claims_are_taken_in_one_order_each_key_once() -> None:
    claims = ordered_claims(["b", "a", "b", "c"])
    assert [data_id for _, data_id in claims] == sorted(
        {"a", "b", "c"}, key=claim_key)
    assert [key for key, _ in claims] == sorted(claim_key(d) for d in "abc")
    assert all(-(2**63) <= key < 2**63 for key, _ in claims)
    assert [k for k, _ in ordered_claims(["a"] * 3)] == [claim_key("a")]


def test_claims_of_different_files_never_wait_for_each_other(tmp_path: Path) -> None:
    """A batch held at a slow download keeps its files claimed: a batch of other files goes on
    (lock files were once shared by buckets of data_ids, and such a batch waited, then failed)."""
    held = [f"wis2/x/held-{i}" for i in range(500)]
    others = [f"wis2/x/other-{i}" for i in range(500)]
    with SqliteLedger.in_dir(tmp_path).claim(held, timeout=1):
        assert claim_in_another_thread(SqliteLedger.in_dir(tmp_path), others, 0.5) == []


def claim_in_another_thread(ledger: SqliteLedger, data_ids: list[str],
                            timeout: float) -> list[BaseException]:
    """Claim `data_ids` in a thread of its own (a claim never waits for its own thread's);
    what the claim raised."""
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            with ledger.claim(data_ids, timeout=timeout):
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=claim)
    thread.start()
    thread.join(30)
    return errors


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_claim_holds_one_file_descriptor_whatever_its_size(tmp_path: Path) -> None:
    """Batches of 200 on 8 slots once held a lock file per data_id: 1,600 descriptors, past
    the 1,024 that select() can watch, and paho-mqtt's loop broke the worker's broker
    connections (no CONNACK, 10 s lost per batch). A claim is one open file now, and leaves
    nothing behind but that one file."""
    data_ids = [f"wis2/x/file-{i}" for i in range(2000)]
    ledger = SqliteLedger.in_dir(tmp_path)
    before = _open_files()
    with ledger.claim(data_ids, timeout=1):
        assert _open_files() - before == 1
        # each data_id still held, the last one too
        refused = claim_in_another_thread(ledger, ["wis2/x/file-1999"], 0.1)
        assert len(refused) == 1 and isinstance(refused[0], ClaimTimeout)
        assert "file-1999" in str(refused[0])
    assert _open_files() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "claim" in p.name) == ["claims.lock"]
    assert (tmp_path / "claims.lock").stat().st_size == 0


def test_a_claim_released_while_another_waits_passes_to_exactly_one(tmp_path: Path) -> None:
    """Four threads of one process claiming one data_id 50 times each: never two inside."""
    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        for _ in range(50):
            with SqliteLedger.in_dir(tmp_path).claim(["wis2/x/a"], timeout=30):
                with guard:
                    inside += 1
                    most = max(most, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert most == 1


def test_the_ledger_location_follows_the_settings(tmp_path: Path) -> None:
    local = ChainSettings(results_dir=tmp_path)
    assert ledger_location(local) == str(tmp_path / "publication-ledger.sqlite3")
    assert isinstance(open_ledger(ledger_location(local)), SqliteLedger)
    url = "postgresql://wis2@db:5432/wis2_ledger"
    assert ledger_location(ChainSettings(ledger_url=url)) == url
    with pytest.raises(ValidationError, match=r"must not contain a password.*PGPASSWORD"):
        ChainSettings(ledger_url="postgresql://wis2:secret@db/wis2_ledger")
    with pytest.raises(ValidationError, match="postgresql://"):
        ChainSettings(ledger_url="mysql://db/x")
    with pytest.raises(ValidationError, match="redis://"):
        ChainSettings(results_url="http://cache:6379")


def test_a_claim_inside_a_claim_of_the_same_thread_does_not_wait_for_itself(
        tmp_path: Path) -> None:
    ledger = SqliteLedger.in_dir(tmp_path)
    outside: list[BaseException] = []

    def other_thread() -> None:
        try:
            with ledger.claim(["wis2/x/b"], timeout=0.2):
                pass
        except ClaimTimeout as exc:
            outside.append(exc)

    with ledger.claim(["wis2/x/a", "wis2/x/b"], timeout=0.5):  # a batch
        with SqliteLedger.in_dir(tmp_path).claim(["wis2/x/b"], timeout=0.5):  # one event of it
            pass
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(outside) == 1  # still held for the other threads after the inner claim
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(outside) == 1  # released with the outer claim


def test_ledger_records_many_in_one_transaction(tmp_path: Path) -> None:
    ledger = SqliteLedger.in_dir(tmp_path)
    ledger.record("wis2/x/a", notification_id="old", rel="canonical", checksum="sha256:AAA")
    entries = {"wis2/x/a": LedgerEntry(notification_id="n1", rel="update", checksum="sha256:B"),
               "wis2/x/b": LedgerEntry(notification_id="n2", rel="canonical", pubtime="t")}
    assert ledger.record_many(entries) == 2
    assert SqliteLedger.in_dir(tmp_path).all() == entries
    assert ledger.record_many({}) == 0
