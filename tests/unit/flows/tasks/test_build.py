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
