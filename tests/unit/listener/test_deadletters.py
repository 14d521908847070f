"""The dead-letter store: records deduplicated, replayed, reopened; ids checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from listener.deadletters import DeadLetter, DeadLetterStore


def test_deadletter_store_dedupes_and_replays(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl")
    assert store.list() == []
    a = store.add(DeadLetter.new("t/1", b"\xff bin", "not_utf8", "not UTF-8"))
    b = store.add(DeadLetter.new("t/1", b"{x", "not_json", "not JSON"))
    again = store.add(DeadLetter.new("t/1", b"{x", "not_json", "not JSON"))
    assert again.id == b.id and again.count == 2
    assert {x.id for x in store.list()} == {a.id, b.id}
    assert store.get(a.id).payload is None and store.get(a.id).payload_bytes() == b"\xff bin"
    store.set_payload(b.id, b'{"fixed": true}')
    failed = store.mark_replayed(a.id, "t/1")
    store.unmark_replayed(a.id, failed)
    assert store.get(a.id).replays == []
    store.mark_replayed(b.id, "t/1")
    assert [x.id for x in store.list()] == [a.id]
    assert store.get(b.id).status == "replayed" and len(store.list(include_replayed=True)) == 2
    assert not list((tmp_path / "dl").glob(".tmp-*"))
    # a replayed, unchanged copy that comes back reopens its record
    store.mark_replayed(a.id, "t/1")
    assert store.get(a.id).status == "replayed"
    store.add(DeadLetter.new("t/1", b"\xff bin", "not_utf8", "not UTF-8"))
    assert store.get(a.id).status == "open" and store.get(a.id).count == 2
    with pytest.raises(KeyError):
        store.get("../../etc/passwd")
