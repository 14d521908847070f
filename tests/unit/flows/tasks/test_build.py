"""`small_contents`: which files the build fetches to inline them (no network here: the fetch is
replaced by a recorder)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from flows.tasks import build
from tests.fixtures.paths import DATA
from wis2.cloudevent import parse_event
from wis2.dataset import load_dataset

CONTENT = b"AAXX 05121 07149 11458 72305"


def _event(content: bytes = CONTENT, **changes: Any):
    event = json.loads((DATA / "events" / "synop-event.json").read_text(encoding="utf-8"))
    (asset,) = event["data"]["assets"].values()
    asset["file:size"] = len(content)
    asset["file:checksum"] = "1220" + hashlib.sha256(content).hexdigest()
    return parse_event(event | changes)


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fetch(client: Any, href: str, size: int) -> bytes:
        calls.append(href)
        return CONTENT

    monkeypatch.setattr(build, "fetch_small_file", fetch)
    return calls


def test_a_small_file_of_an_inlining_core_dataset_is_fetched(fetched: list[str]) -> None:
    synop = load_dataset("synop")
    assert build.small_contents(_event(), synop) == {
        "WIGOS_0-20000-0-07149_20261205T120000.bufr4": CONTENT}
    assert len(fetched) == 1


def test_nothing_is_fetched_when_it_cannot_be_inlined(fetched: list[str]) -> None:
    synop = load_dataset("synop")
    assert build.small_contents(_event(), load_dataset("argo")) == {}  # no inline_content
    assert build.small_contents(_event(operation="delete"), synop) == {}
    assert build.small_contents(_event(b"x" * 4097), synop) == {}  # announced too large
    outside = synop.model_copy(update={"allowed_href_prefixes": ["https://allowed.example/"]})
    assert build.small_contents(_event(), outside) == {}
    assert fetched == []


def test_bytes_that_do_not_match_the_checksum_are_not_inlined(fetched: list[str]) -> None:
    event = _event(b"A" * len(CONTENT))  # announces other bytes of the same size
    assert build.small_contents(event, load_dataset("synop")) == {}
    assert len(fetched) == 1


def test_a_build_the_ledger_now_contradicts_is_built_again_unless_announced() -> None:
    """A cached build of an event made before another event recorded a new version of its
    file: built again against the ledger (an update), unless announced (same id kept)."""
    from datetime import UTC, datetime

    from chain.ledger import LedgerEntry

    argo = load_dataset("argo")
    event = parse_event(json.loads((DATA / "demo-event.json").read_text()))
    cached = build.notifications_for(event, argo, _Ledger({}), datetime.now(UTC))
    assert [n.rel for n in cached] == ["canonical"]
    data_id = cached[0].properties.data_id
    newer = _Ledger({data_id: LedgerEntry(notification_id="other", rel="canonical",
                                          checksum="sha256:another")})
    same = _Ledger({data_id: LedgerEntry(notification_id="other", rel="canonical",
                                         checksum=build.checksum_of(cached[0]))})
    assert build.outdated(event, cached, _Ledger({})) == []
    assert build.outdated(event, cached, same) == []  # the same file: announced already
    assert build.outdated(event, cached, newer) == [data_id]

    assert build.current_build(event, argo, cached, _Ledger({}), lambda note: False) is None
    assert build.current_build(event, argo, cached, newer, lambda note: True) is None
    again = build.current_build(event, argo, cached, newer, lambda note: False)
    assert again is not None and [n.rel for n in again] == ["update"]
    assert again[0].id != cached[0].id and again[0].properties.data_id == data_id


class _Ledger:
    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries = entries

    def get(self, key: str) -> Any:
        return self.entries.get(key)
